import torch
import torch.nn.functional as F

from mmdistill.retrieval import METRICS, recall_at_k


def brute_force(img: torch.Tensor, txt: torch.Tensor, cap_img: torch.Tensor) -> dict[str, float]:
    """Reference by full sorting, one query at a time."""
    sim = img @ txt.T
    out = {}
    tr_ranks = []
    for i in range(img.shape[0]):
        order = torch.argsort(sim[i], descending=True).tolist()
        gt = set(torch.nonzero(cap_img == i).flatten().tolist())
        tr_ranks.append(min(order.index(j) for j in gt))
    ir_ranks = []
    for j in range(txt.shape[0]):
        order = torch.argsort(sim[:, j], descending=True).tolist()
        ir_ranks.append(order.index(int(cap_img[j])))
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


def test_perfect_and_reversed_embeddings() -> None:
    n = 12
    cap_img = torch.arange(n).repeat_interleave(2)
    img = torch.eye(n)
    assert recall_at_k(img, img[cap_img], cap_img)["r_mean"] == 100.0
    worst = recall_at_k(img, -img[cap_img], cap_img)
    assert worst["TR@1"] == 0.0 and worst["IR@1"] == 0.0
