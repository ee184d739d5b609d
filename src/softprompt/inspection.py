"""What a learned prompt is close to: nearest vocabulary tokens, norms, similarity plots.

For a ``[P, H]`` prompt (methods prompt, ptuning, residual): each virtual token's k nearest
vocabulary tokens by cosine similarity with the input embedding table ``[V, H]`` (as Lester
et al. 2021, section 7, read their prompts), and its norm's percentile among the table's
norms. For a KV prefix ``[L, 2, kv_heads, P, head_dim]``: each layer's key and value norm per
virtual token. For both: the ``[P, P]`` cosine similarity between virtual tokens, drawn as a
heat map (PNG, matplotlib's Agg backend). Works on our prompt directories and on PEFT adapters.

(Named ``inspection`` so that it never shadows the standard library's ``inspect``.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from softprompt.errors import SoftPromptError


@dataclass
class Neighbour:
    """A vocabulary token near a virtual token."""

    token: str
    token_id: int
    cosine: float


@dataclass
class VirtualToken:
    """One row of a ``[P, H]`` prompt: its norm and nearest vocabulary tokens."""

    index: int
    norm: float
    norm_percentile: float  # % of the embedding table's rows with a smaller norm
    nearest: list[Neighbour]


@dataclass
class PromptInspection:
    """What :func:`inspect_prompt` found. Lists are plain floats (JSON-ready)."""

    source: str
    model: str
    method: str  # "prompt" ([P, H]) or "prefix" (KV prefix)
    num_virtual_tokens: int
    similarity: list[list[float]]  # [P, P] cosine similarity between virtual tokens
    tokens: list[VirtualToken] = field(default_factory=list)  # [P, H] prompts only
    key_norms: list[list[float]] | None = None  # [L, P], prefixes only
    value_norms: list[list[float]] | None = None  # [L, P], prefixes only
    plot: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A plain-text table: one line per virtual token (or per layer for a prefix)."""
        lines = [f"{self.source}: {self.method}, {self.num_virtual_tokens} virtual tokens, "
                 f"model {self.model}"]
        if self.tokens:
            lines.append(f"{'#':>3}  {'norm':>7}  {'pctl':>5}  nearest tokens (cosine)")
            for t in self.tokens:
                near = ", ".join(f"{n.token!r} {n.cosine:.2f}" for n in t.nearest)
                lines.append(f"{t.index:>3}  {t.norm:7.3f}  {t.norm_percentile:4.0f}%  {near}")
        if self.key_norms is not None and self.value_norms is not None:
            lines.append(f"{'layer':>5}  {'key norm':>9}  {'value norm':>10}  (mean over "
                         f"virtual tokens)")
            for i, (k, v) in enumerate(zip(self.key_norms, self.value_norms)):
                lines.append(f"{i:>5}  {sum(k) / len(k):9.3f}  {sum(v) / len(v):10.3f}")
        p = torch.tensor(self.similarity)
        off = p[~torch.eye(len(p), dtype=torch.bool)]
        if off.numel():
            lines.append(f"similarity between virtual tokens: mean {off.mean():.2f}, "
                         f"max {off.max():.2f}")
        if self.plot:
            lines.append(f"plot: {self.plot}")
        return "\n".join(lines)


def cosine_matrix(rows: torch.Tensor) -> torch.Tensor:
    """``[P, D]`` -> ``[P, P]`` cosine similarity between rows."""
    unit = torch.nn.functional.normalize(rows.float(), dim=-1)
    return unit @ unit.T


def nearest_tokens(prompt: torch.Tensor, table: torch.Tensor, tokenizer,
                   top_k: int) -> list[VirtualToken]:
    """Each row of ``prompt`` ``[P, H]`` against ``table`` ``[V, H]``: top-k cosine neighbours
    and the row's norm percentile among the table's norms."""
    table = table.float()
    sims = (torch.nn.functional.normalize(prompt.float(), dim=-1)
            @ torch.nn.functional.normalize(table, dim=-1).T)  # [P, V]
    values, ids = sims.topk(min(top_k, table.shape[0]), dim=-1)  # [P, k]
    table_norms = table.norm(dim=-1)  # [V]
    result = []
    for i, row in enumerate(prompt.float()):
        norm = row.norm()
        near = [Neighbour(tokenizer.decode([int(t)]), int(t), round(float(s), 4))
                for s, t in zip(values[i], ids[i])]
        pct = float((table_norms < norm).float().mean() * 100)
        result.append(VirtualToken(i, round(float(norm), 4), round(pct, 1), near))
    return result


def prefix_norms(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, 2, kv_heads, P, head_dim]`` -> key and value norms ``[L, P]`` (over all heads)."""
    layers, _, heads, p, head_dim = kv.shape
    flat = kv.float().permute(0, 1, 3, 2, 4).reshape(layers, 2, p, heads * head_dim)
    norms = flat.norm(dim=-1)  # [L, 2, P]
    return norms[:, 0], norms[:, 1]


def _load(directory: Path):
    """``(PromptLike, meta)``: ours, or a PEFT adapter read as it is stored (inspection needs
    no layout decision, so a PROMPT_TUNING adapter is shown even where BOS makes it differ)."""
    from softprompt import interop
    from softprompt.prompt import load_prompt_tensor

    if interop.is_peft_adapter(directory):
        return interop.read_adapter(directory, check_layout=False)
    return load_prompt_tensor(directory)


def inspect_prompt(directory: str | Path, *, top_k: int = 5, model: str | None = None,
                   plot: str | Path | None = None,
                   loaded: tuple[Any, Any] | None = None) -> PromptInspection:
    """Inspect the prompt in ``directory`` (ours or a PEFT adapter).

    Args:
        top_k: nearest vocabulary tokens per virtual token (``[P, H]`` prompts).
        model: the model whose embedding table to compare with (default: the prompt's).
        plot: write a PNG there: the similarity heat map, and for a prefix the per-layer
            key/value norms beside it.
        loaded: an already loaded ``(model, tokenizer)``.
    """
    if top_k < 1:
        raise SoftPromptError(f"--top-k must be at least 1, got {top_k}")
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise SoftPromptError(f"--plot {plot}: give a .png path")
    directory = Path(directory)
    prompt, meta = _load(directory)
    name = model or meta.model
    if isinstance(prompt, torch.Tensor):
        from softprompt import models
        from softprompt.prompt import check_hidden_size

        lm, tokenizer = loaded or models.load_model(name, dtype="float32", device="cpu")
        table = lm.get_input_embeddings().weight.detach().to("cpu")
        check_hidden_size(prompt, table.shape[1], str(directory))
        result = PromptInspection(str(directory), name, "prompt", prompt.shape[0],
                                  _rounded(cosine_matrix(prompt)),
                                  tokens=nearest_tokens(prompt, table, tokenizer, top_k))
    else:
        keys, values = prefix_norms(prompt.kv)
        flat = prompt.kv.permute(3, 0, 1, 2, 4).reshape(prompt.kv.shape[3], -1)  # [P, L*2*h*d]
        result = PromptInspection(str(directory), name, "prefix", prompt.kv.shape[3],
                                  _rounded(cosine_matrix(flat)), key_norms=_rounded(keys),
                                  value_norms=_rounded(values))
    if plot is not None:
        draw(result, plot)
        result.plot = str(plot)
    return result


def _rounded(t: torch.Tensor) -> list[list[float]]:
    return [[round(float(x), 4) for x in row] for row in t]


def draw(result: PromptInspection, path: str | Path) -> None:
    """One PNG: the ``[P, P]`` similarity heat map; for a prefix, per-layer mean key and value
    norms (with the spread over virtual tokens) beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from softprompt import atomic

    panels = 2 if result.key_norms is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    image = ax.imshow(result.similarity, cmap="viridis", vmin=-1, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_title(f"{result.method}: virtual token similarity")
    ax.set_xlabel("virtual token")
    ax.set_ylabel("virtual token")
    if result.tokens:  # name each row by its nearest vocabulary token
        ax.set_yticks(range(len(result.tokens)),
                      [f"{t.index} {t.nearest[0].token!r}" for t in result.tokens])
    if result.key_norms is not None and result.value_norms is not None:
        ax = axes[0][1]
        for label, norms in (("keys", result.key_norms), ("values", result.value_norms)):
            t = torch.tensor(norms)  # [L, P]
            layers = range(t.shape[0])
            ax.plot(layers, t.mean(1), marker="o", label=f"{label} (mean)")
            ax.fill_between(layers, t.min(1).values, t.max(1).values, alpha=0.2)
        ax.set_title("prefix norms per layer (band: min-max over tokens)")
        ax.set_xlabel("layer")
        ax.set_ylabel("L2 norm over heads")
        ax.legend()
    fig.tight_layout()
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic.write_bytes(Path(path), buffer.getvalue())
