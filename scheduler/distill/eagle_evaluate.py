"""A head's acceptance, simulated: on held-out greedy answers of the target, the head drafts a chain
of `depth` tokens from every answer position, teacher-forced (EagleHead.unroll), and a draft counts
as accepted while it and every draft before it is the target's greedy token. On greedy answers the
tokens the unrolled head reads are then exactly those it would have drafted itself, so this is the
acceptance a serving step that starts there sees, without running the engine."""

from __future__ import annotations

import torch

from scheduler.distill.eagle_train import _shifted
from scheduler.distill.features import Features, collate, column_map
from scheduler.speculative.eagle.head import EagleHead


@torch.no_grad()
def simulated_acceptance(head: EagleHead, features: list[Features], depth: int, batch_size: int = 8) -> dict:
    """Per position, the share of chains accepted up to there; the mean share of drafted tokens
    accepted; the mean accepted drafts per step; how many chains were judged."""
    columns = column_map(head.vocab_ids, head.config["vocab_size"])
    device = head.fc.weight.device
    accepted = torch.zeros(depth)
    chains = 0
    for at in range(0, len(features), batch_size):
        batch = collate(features[at:at + batch_size], columns, device)
        outputs = head.unroll(batch["input_ids"], batch["aux"].float(), depth)
        # A chain starts at row i (the head reads token i + 1) once every position it is judged at holds the
        # target's distribution: from the last prompt token on, depth positions before the end.
        starts = batch["known"] & _shifted(batch["known"], depth, False)
        still = starts.clone()
        for s, hidden in enumerate(outputs):
            drafted = head.token_ids(head.logits(hidden).argmax(-1))
            still &= drafted == _shifted(batch["greedy"], 1 + s, -1)
            accepted[s] += still.sum().item()
        chains += int(starts.sum())
    per_position = (accepted / max(chains, 1)).tolist()
    return {"depth": depth, "chains": chains, "per_position": [round(a, 4) for a in per_position],
            "per_drafted_token": round(sum(per_position) / depth, 4),
            "accepted_per_step": round(sum(per_position), 3)}


def simulated_report(head: EagleHead, held_out: list[Features], depth: int) -> dict:
    """simulated_acceptance for each kind of held-out answer (code, chat)."""
    kinds = sorted({f.kind for f in held_out})
    return {kind: simulated_acceptance(head, [f for f in held_out if f.kind == kind], depth) for kind in kinds}


def format_simulated(report: dict) -> str:
    lines = []
    for kind, r in report.items():
        cells = " ".join(f"{a:.3f}" for a in r["per_position"])
        lines.append(f"held-out {kind:5s} (simulated, depth {r['depth']}, greedy, {r['chains']} chains): accepted "
                     f"{r['per_drafted_token']:.3f} of drafted tokens, {r['accepted_per_step']:.2f} per step; "
                     f"by position {cells}")
    return "\n".join(lines)
