"""The one-screen summary of a GPU check report (what run.sh prints at the end)."""

from __future__ import annotations

from typing import Any

WIDTH = 100


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def step_line(step: dict[str, Any]) -> str:
    status = step["status"]
    if status == "skipped":
        what = step.get("reason", "")
    elif status == "failed":
        what = step.get("error", "")
    else:
        what = step.get("result", {}).get("summary", "")
    seconds = f"{step.get('seconds', 0):>4.0f}/{step.get('budget_seconds', 0):<4.0f}"
    if status == "skipped":
        seconds = " " * len(seconds)
    return clip(f"{step['name']:<22} {status:<7} {seconds} {what}", WIDTH)


def training_rows(steps: list[dict[str, Any]]) -> list[str]:
    """The bench's training figures, one line per run, from every figures step that has rows."""
    rows = [
        row
        for step in steps
        for row in step.get("result", {}).get("rows", [])
        if step["name"].startswith(("figures.training", "figures.memory"))
    ]
    if not rows:
        return []
    lines = [
        "run                     prec  steps/s  img/s  TFLOP/s   MFU  "
        "data/fwd/bwd/opt ms        peak MiB",
    ]
    for row in rows:
        if "error" in row or "skipped" in row:
            why = row.get("error") or f"skipped: {row['skipped']}"
            lines.append(
                clip(f"{row.get('label', '?'):<23} {row.get('precision', ''):<5} {why}", WIDTH)
            )
            continue
        split = row.get("phase_seconds", {})
        ms = "/".join(
            f"{1000 * split.get(p, 0):.0f}" for p in ("data", "forward", "backward", "optimizer")
        )
        peak = row.get("peak_allocated_mib", row.get("peak_rss_mib", 0))
        mfu = row.get("mfu")
        lines.append(
            f"{row.get('label', '?'):<23} {row.get('precision', ''):<5} "
            f"{row.get('steps_per_second', 0):>7.2f} {row.get('images_per_second', 0):>6.1f} "
            f"{row.get('achieved_tflops', 0):>8.3g} {'-' if mfu is None else f'{mfu:.1%}':>5}  "
            f"{ms:<24} {peak:>8.0f}"
        )
    return lines


def render(report: dict[str, Any]) -> str:
    env = report.get("environment", {})
    counts = report["counts"]
    head = (
        f"GPU check ({report['mode']}) on {env.get('device', '?')}, torch {env.get('torch', '?')},"
        f" {report['started']}: {counts['passed']} passed, {counts['failed']} failed,"
        f" {counts['skipped']} skipped in {report['wall_seconds']:.0f} s"
        f" (setup {report['setup_seconds']:.0f} s, budget {report['budget_seconds']:.0f} s)"
    )
    lines = [clip(head, 2 * WIDTH), f"{'step':<22} {'status':<7} {'s/budget':<9} what"]
    lines += [step_line(step) for step in report["steps"]]
    rows = training_rows(report["steps"])
    if rows:
        lines += ["", *rows]
    return "\n".join(lines)
