"""The Python API: `mmdistill.load` a distilled set as a torch Dataset, `mmdistill.run` a job.

The command line stays the one way a job runs; `run` calls it in this process and hands back
the run folder, so a notebook gets the same folders, resume and errors as the shell.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset

from mmdistill.errors import UserError
from mmdistill.models.student import is_image_features, is_text_features
from mmdistill.training.pairs import MODALITIES, PairSet


class DistilledSet(Dataset):
    """A distilled set as `(image, text)` items, ready for a DataLoader.

    `image` is normalised pixels `[3, H, W]` (the encoder's mean and std) or a frozen image-trunk
    feature `[D]`; `text` is token ids `[L]` (padding masked by `text_mask[i]`), token
    embeddings `[L, E]`, or a frozen text-trunk feature `[D]`. `image_space` / `text_space` say
    which, `encoder` names the encoder whose trunks read them, `storage` how the rows were
    stored. A set with a learned target similarity (LoRS, MDW) keeps it in `to_pair_set()`.
    """

    def __init__(self, pairs: PairSet, config: DictConfig, source: Path) -> None:
        self.pairs, self.config, self.source = pairs, config, source

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        j = i if self.pairs.image_index is None else int(self.pairs.image_index[i])
        return self.pairs.images[j], self.pairs.texts[i]

    @property
    def text_mask(self) -> Tensor | None:
        """`[N, L]` true at real tokens, for token-id sets; None otherwise."""
        return self.pairs.text_mask

    @property
    def encoder(self) -> str:
        """The `encoder=` the set was distilled for (evaluate with the same one)."""
        return str(self.config.encoder.name)

    @property
    def encoder_config(self) -> dict[str, Any]:
        """That encoder's full config: trunks, image size, normalisation, text length."""
        return OmegaConf.to_container(self.config.encoder, resolve=True)  # type: ignore[return-value]

    @property
    def image_space(self) -> str:
        return "features" if is_image_features(self.pairs.images) else "pixels"

    @property
    def text_space(self) -> str:
        texts = self.pairs.texts
        if is_text_features(texts):
            return "features"
        return "embeddings" if texts.is_floating_point() else "tokens"

    @property
    def storage(self) -> dict[str, str]:
        """How each modality was stored: float32, float16, int8 (codes and per-row scales)
        or low-rank (coefficients on a basis), decoded here to float32 rows."""
        out = {}
        for name in MODALITIES:
            factor = self.pairs.factors.get(name)
            if factor is None:
                out[name] = str(getattr(self.pairs, name).dtype).removeprefix("torch.")
                continue
            kind = "int8" if factor.scale is not None else str(factor.coef.dtype)[6:]
            rank = None if factor.basis is None else factor.basis.shape[0]
            out[name] = kind if rank is None else f"low-rank {rank}, {kind}"
        return out

    def to_pair_set(self) -> PairSet:
        """The PairSet mmdistill's own students train on (`mmdistill.training`)."""
        return self.pairs

    def __repr__(self) -> str:
        return (
            f"DistilledSet({len(self)} pairs of {self.image_space} and {self.text_space}, "
            f"encoder={self.encoder}, from {self.source})"
        )


def load(path: str | Path) -> DistilledSet:
    """A distilled set from a distill run folder or a `mmdistill export --format hf` folder.

    >>> import mmdistill, torch
    >>> ds = mmdistill.load(folder)  # a folder from mmdistill.run (below), or an HF export
    >>> len(ds), ds.image_space, ds.text_space, ds.encoder, ds.storage["images"]
    (10, 'pixels', 'tokens', 'tiny', 'float32')
    >>> image, text = ds[0]
    >>> loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=True)
    >>> images, texts = next(iter(loader))
    >>> images.shape
    torch.Size([5, 3, 32, 32])
    """
    from mmdistill.report.share import read_set, source_config

    source = Path(path).expanduser()
    if not source.is_dir():
        raise UserError(f"{source} is not a folder; give a distill run folder or an HF export")
    return DistilledSet(read_set(source), source_config(source), source)


def run(verb: str, overrides: Iterable[str] | Mapping[str, Any] = (), *flags: str) -> Path:
    """Run `mmdistill <verb> <overrides>` in this process; its run folder (a sweep's folder
    with `-m`). A failed job raises UserError with the command's one-line reason.

    >>> import mmdistill
    >>> folder = mmdistill.run("distill", {"method": "random", "budget.pairs": 10, "debug": "tiny"})
    [...][mmdistill.sweeps][INFO] - torch threads: ...
    >>> sorted(p.name for p in folder.glob("*.json"))
    ['distilled.json', 'meta.json', 'results.json', 'students.json']
    """
    from mmdistill import cli

    if isinstance(overrides, Mapping):
        args = [f"{k}={_value(v)}" for k, v in overrides.items()]
    else:
        args = [str(a) for a in overrides]
    cli.LAST_RUN.clear()
    try:
        cli.main([verb, *args, *flags])
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise UserError(
                f"mmdistill {verb} failed (exit {stop.code}); its reason is printed above"
            ) from None
    if not cli.LAST_RUN:
        raise UserError(f"mmdistill {verb} ran no job (a --help or --cfg flag?)")
    return cli.LAST_RUN[-1]


def _value(v: Any) -> str:
    """A Python value as Hydra override text: lists as [a,b], None as null."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list | tuple):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)
