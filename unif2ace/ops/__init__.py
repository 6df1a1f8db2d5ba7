from unif2ace.ops.loss import d3diff_loss, linear_d3diff_loss, row_lse_target, softmax_onehot_grad  # noqa: F401
from unif2ace.ops.moe import balance_loss, grouped_mlp, moe_combine, moe_dispatch, moe_gate  # noqa: F401
from unif2ace.ops.sampling import (  # noqa: F401
    maskgit_generate,
    maskgit_step,
    philox_noise,
    sample_next_token,
)
