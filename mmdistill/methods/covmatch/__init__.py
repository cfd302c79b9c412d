"""CovMatch (Lee & Chung, NeurIPS 2025): cross-covariance matching with online encoders.

With linear heads and a linearised contrastive loss, the heads' optimum depends on the data
only through the image-text cross-covariance of trunk features, so distillation reduces to
matching it: loss = ||rho C_real - C_syn||_F^2 + lambda (mean-matching of projected features per
modality). No experts and no unrolling: only the synthetic data is updated by this loss, while
an online student (trunks where the encoder trains them, plus fresh linear heads) takes one
ordinary contrastive step on real data between synthetic updates and is reset every
`reset_every` steps.

Where the data live follows the encoder: pixels when the image trunk trains, token-embedding
sequences `[N, L, E]` (fed to the text trunk like `inputs_embeds`) when the text trunk trains,
and frozen-trunk features otherwise. In feature space C_syn is the cross-covariance of the
synthetic features themselves, and the heads enter only through the mean term.

Factorised sets (`rank`, our extension, feature space only): each modality is stored as
coefficients on the top-`rank` singular directions of the real cross-covariance plus the real
mean, so a budget of N pairs' bytes holds many more pairs, all inside the subspace where the
best rank-`rank` approximation of C_real lives; the coefficients are what the loss updates.

Resetting: `reset_to: fresh` rebuilds the online student with a new seed each round, which for
a pretrained encoder is a pristine pretrained copy and for a random-init encoder (`tiny`) a
new random draw, like the students evaluation trains; `initial` keeps one trunk init for every
round (only differs from `fresh` for random-init encoders). Heads are always fresh.

The package: `loss` (the loss and its Gram form), `targets` (how real pairs are averaged, and
extra terms such as the within-modality covariances), `robust` (clean-probability weights),
`storage` (float32, int8 or low-rank rows), `start` (initial pairs), `method` (settings, checks
and the plan of a run) and `matching` (the run inside the shared outer loop, methods/loop.py).
"""

from mmdistill.methods.covmatch.loss import covmatch_loss, cross_covariance, weighted_statistics
from mmdistill.methods.covmatch.method import CovMatch
from mmdistill.methods.covmatch.robust import PairWeights, RobustSettings
from mmdistill.methods.covmatch.storage import factored_pairs

__all__ = [
    "CovMatch",
    "PairWeights",
    "RobustSettings",
    "covmatch_loss",
    "cross_covariance",
    "factored_pairs",
    "weighted_statistics",
]
