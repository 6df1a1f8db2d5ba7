"""Face data: the synthetic fine-grained face renderer and the `FaceDataset` loader."""
from unif2ace.data.synthetic import (  # noqa: F401
    FAMILIES, IDENTITY_ATTRIBUTES, SCHEMA, generate_sample, hidden_attributes, make_caption, make_vqa,
    render_face, sample_attributes, sample_identity, synthetic_images, validate_attributes, value_text,
    write_synthetic_dataset,
)
from unif2ace.data.dataset import FaceDataset, collate_faces, image_to_tensor, parse_vqa  # noqa: F401
