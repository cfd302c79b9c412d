import pytest
import torch
import torch.nn.functional as F

from mmdistill.training.retrieval import METRICS, NonFiniteEmbeddings, recall_at_k


def brute_force(img: torch.Tensor, txt: torch.Tensor, cap_img: torch.Tensor) -> dict[str, float]:
    """Reference, one query at a time in plain Python: a ground truth's rank is the number of
    wrong candidates scoring at least as high (ties count against the query)."""
    sim = (img @ txt.T).tolist()
    owner = cap_img.tolist()
    tr_ranks = []
    for i, row in enumerate(sim):
        best_own = max(s for j, s in enumerate(row) if owner[j] == i)
        tr_ranks.append(sum(1 for j, s in enumerate(row) if owner[j] != i and s >= best_own))
    ir_ranks = []
    for j in range(len(owner)):
        gt = sim[owner[j]][j]
        ir_ranks.append(sum(1 for i in range(len(sim)) if i != owner[j] and sim[i][j] >= gt))
    out = {}
    for k in (1, 5, 10):
        out[f"TR@{k}"] = 100 * sum(r < k for r in tr_ranks) / len(tr_ranks)
    for k in (1, 5, 10):
        out[f"IR@{k}"] = 100 * sum(r < k for r in ir_ranks) / len(ir_ranks)
    return out


def test_recall_matches_brute_force_with_five_captions_per_image() -> None:
    g = torch.Generator().manual_seed(0)
    n_img = 40
    cap_img = torch.arange(n_img).repeat_interleave(5)
    img = F.normalize(torch.randn(n_img, 16, generator=g), dim=-1)
    # captions near their image so recalls are neither 0 nor 100
    txt = F.normalize(img[cap_img] + 1.2 * torch.randn(len(cap_img), 16, generator=g), dim=-1)
    got = recall_at_k(img, txt, cap_img, block=7)  # small block exercises the chunking
    ref = brute_force(img, txt, cap_img)
    for m in METRICS:
        assert abs(got[m] - ref[m]) < 1e-9, m
    assert 0 < got["TR@1"] < 100 and 0 < got["IR@5"] < 100
    assert abs(got["r_mean"] - sum(ref.values()) / 6) < 1e-9


def test_ties_match_brute_force_on_coarsely_quantised_embeddings() -> None:
    """Embeddings on a coarse grid give many exact ties; both rankings count them the same."""
    g = torch.Generator().manual_seed(1)
    cap_img = torch.arange(30).repeat_interleave(5)
    img = torch.randint(-1, 2, (30, 4), generator=g).float()
    txt = torch.randint(-1, 2, (150, 4), generator=g).float()
    got = recall_at_k(img, txt, cap_img, block=11)
    ref = brute_force(img, txt, cap_img)
    for m in METRICS:
        assert abs(got[m] - ref[m]) < 1e-9, m


def test_perfect_and_reversed_embeddings() -> None:
    n = 12
    cap_img = torch.arange(n).repeat_interleave(2)
    img = torch.eye(n)
    assert recall_at_k(img, img[cap_img], cap_img)["r_mean"] == 100.0
    worst = recall_at_k(img, -img[cap_img], cap_img)
    assert worst["TR@1"] == 0.0 and worst["IR@1"] == 0.0


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_constant_embeddings_score_no_better_than_chance(value: float) -> None:
    """A collapsed student (every embedding equal, or all zero) used to score 100 because ties
    counted as hits. Chance is K / candidates; ties against the query give 0 here."""
    n_img, per = 50, 5
    cap_img = torch.arange(n_img).repeat_interleave(per)
    img = torch.full((n_img, 8), value)
    txt = torch.full((n_img * per, 8), value)
    got = recall_at_k(img, txt, cap_img)
    for k in (1, 5, 10):
        assert got[f"IR@{k}"] <= 100 * k / n_img
        # TR: an image has `per` right captions among n_img * per candidates.
        assert got[f"TR@{k}"] <= 100 * min(1.0, k * per / (n_img * per - per + 1))
    assert got["r_mean"] == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_refused(bad: float) -> None:
    cap_img = torch.arange(4).repeat_interleave(2)
    img = torch.eye(4)
    txt = img[cap_img].clone()
    txt[3, 0] = bad
    with pytest.raises(NonFiniteEmbeddings, match="not finite"):
        recall_at_k(img, txt, cap_img)
