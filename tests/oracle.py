"""An independent oracle: materialise every logit, in float64 (or the input dtype)."""

import torch

IGNORE = -100


def naive_logprobs(hidden, weight, labels, bias=None, *, cu_seqlens=None, reduction="sum",
                   temperature=1.0, logit_scale=1.0, softcap=None, ignore_index=IGNORE,
                   dtype=torch.float64):
    """Per-sequence (or per-token) log-probs and stats with full logits.

    ``dtype=None`` is "torch in the input dtype": the matmul runs in the input dtype (logits
    rounded to it, as a trainer's ``lm_head`` would), the softmax in float32.
    """
    if dtype is None:
        x = hidden @ weight.T
        if bias is not None:
            x = x + bias
        x = x.float()
    else:
        x = hidden.to(dtype) @ weight.to(dtype).T
        if bias is not None:
            x = x + bias.to(dtype)
    if softcap is None:
        z = x * logit_scale / temperature
    else:
        z = softcap * torch.tanh(x * logit_scale / softcap) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    tok = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    stats = {
        "logits_sum": z.mean(-1),
        "entropy_sum": -(p * logp_all).sum(-1),
        "top1_correct": (z.argmax(-1) == safe).to(z.dtype),
        "log_sum_sq_probs_sum": torch.logsumexp(2 * logp_all, dim=-1),
    }
    vals = {"logps": tok, **stats}
    vals = {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in vals.items()}
    vals["num_tokens"] = valid.to(z.dtype)
    if reduction == "none":
        return vals
    if cu_seqlens is None:
        out = {k: v.sum(-1) if v.dim() == 2 else v.sum().reshape(1) for k, v in vals.items()}
    else:
        bounds = cu_seqlens.tolist()
        out = {k: torch.stack([v[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
               for k, v in vals.items()}
    if reduction == "mean":
        out["logps"] = out["logps"] / out["num_tokens"].clamp(min=1)
    return out


def assert_close(ours, oracle, same=None, *, tol, what=""):
    """``max|ours − oracle| <= max|same − oracle| + tol·max|oracle|`` (DESIGN.md's rule).

    ``same`` is torch computing the same thing in the input dtype: we must be at least as
    accurate as it, up to ``tol`` relative to the magnitude of the values.
    """
    ours, oracle = ours.double(), oracle.double()
    assert ours.shape == oracle.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values {ours}"
    err = (ours - oracle).abs().max().item() if ours.numel() else 0.0
    base = (same.double() - oracle).abs().max().item() if same is not None and ours.numel() else 0.0
    scale = oracle.abs().max().item() if ours.numel() else 0.0
    assert err <= base + tol * scale, (
        f"{what}: max error {err:.3g} > torch-in-dtype error {base:.3g} + {tol:g} x {scale:.3g}"
    )
