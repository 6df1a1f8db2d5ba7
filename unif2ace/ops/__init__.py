from unif2ace.ops.loss import d3diff_loss, linear_d3diff_loss, row_lse_target, softmax_onehot_grad  # noqa: F401
from unif2ace.ops.moe import (  # noqa: F401
    balance_loss,
    grouped_mlp,
    moe_combine,
    moe_dispatch,
    moe_experts,
    moe_gate,
    moe_sort,
)
from unif2ace.ops.sampling import (  # noqa: F401
    maskgit_generate,
    maskgit_step,
    philox_noise,
    sample_next_token,
)
