"""What the commands print: the loop's results table, the registry status, a lineage trace."""

from __future__ import annotations

import time

from rich import box
from rich.console import Console
from rich.table import Table


def loop_table(model_name: str, rows: list[dict]) -> Table:
    """One row per round of `mlops run` (fits 80 columns: pipes and CI logs are that wide).

    acc: the candidate's test accuracy;
    shadow: the round's candidate beside the champion, agreement / its accuracy on the same
    labelled rows; gate: the paired test's verdict (pass or no) and p-value; decision:
    promoted, kept (the champion stays), or the canary's outcome (canary ok, rollback)."""
    table = Table(
        "#",
        "data",
        "rows",
        "model",
        "acc",
        "shadow",
        "gate",
        "decision",
        "serves",
        "drift",
        title=f"{model_name}: the loop",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )

    def num(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for r in rows:
        shadow = "-"
        if r.get("shadow_agreement") is not None:
            accuracy = num(r.get("shadow_accuracy"), ".3f")
            shadow = f"{r['shadow_agreement']:.0%}/{accuracy}"
        table.add_row(
            str(r["round"]),
            r["data_version"][:7],
            str(r["rows"]),
            f"v{r['model_version']}",
            f"{r['test_accuracy']:.4f}",
            shadow,
            r.get("gate") or "-",
            r.get("decision") or ("promoted" if r["promoted"] else "kept"),
            f"v{r['serving']}",
            num(r.get("drift_score"), ".2f"),
        )
    return table


def print_status(info: dict, console: Console | None = None) -> None:
    """Champion and challenger, then the recent promotion ledger."""
    console = console or Console()
    console.print(f"[bold]{info['model']}[/] at {info['tracking_uri']}")
    for alias in ("champion", "challenger"):
        v = info[alias]
        if v is None:
            console.print(f"  @{alias}: none")
        else:
            acc = "n/a" if v["test_accuracy"] is None else f"{v['test_accuracy']:.4f}"
            console.print(
                f"  @{alias}: v{v['version']}  test accuracy {acc}  "
                f"data {str(v['data_hash'])[:10]}  commit {str(v['git_commit'])[:10]}"
            )
    table = Table(
        "time",
        "action",
        "candidate",
        "champion before",
        "champion after",
        "reason",
        title="promotion ledger (newest first)",
    )
    for e in info["ledger"]:
        table.add_row(
            e["time"],
            e["action"],
            f"v{e['candidate']}" if e["candidate"] else "-",
            f"v{e['from']}" if e["from"] else "-",
            f"v{e['to']}" if e["to"] else "-",
            _short(e["reason"] or ""),
        )
    console.print(table)
    for shadow in info.get("shadow") or []:
        acc = ""
        if shadow["labelled"]:
            acc = (
                f"; on the same {shadow['labelled']} labelled rows: champion "
                f"{shadow['champion_accuracy']:.4f}, shadow {shadow['shadow_accuracy']:.4f}"
            )
        console.print(
            f"  shadow v{shadow['shadow']} beside v{shadow['champion']}: {shadow['rows']} rows, "
            f"agreement {shadow['agreement']:.4f}{acc}"
        )
    performance = info.get("performance") or []
    if performance:
        table = Table(
            "version", "window (UTC)", "rows", "labelled", "label p50", "status", "realized",
            "estimated (95%)", title="live performance (label coverage, realized, estimated)",
        )  # fmt: skip
        for w in performance[-12:]:
            est = "-"
            if w["estimated"] is not None:
                est = f"{w['estimated']:.3f} [{w['estimated_low']:.2f}, {w['estimated_high']:.2f}]"
                if w.get("confidence_shift"):
                    est += " shifted!"
            table.add_row(
                f"v{w['version']}",
                time.strftime("%m-%d %H:%M", time.gmtime(w["start"])),
                str(w["rows"]),
                f"{w['coverage']:.0%}",
                "-" if w["latency_p50_s"] is None else f"{w['latency_p50_s']:.0f} s",
                w["status"],
                "-" if w["realized"] is None else f"{w['realized']:.3f}",
                est,
            )
        console.print(table)
    for line in rollout_lines(info.get("rollout")):
        console.print(f"  {line}", markup=False)
    if info.get("store_error"):
        console.print(f"  prediction store: {info['store_error']}", markup=False)


def _short(text: str, limit: int = 160) -> str:
    """A ledger reason cut for the table (`--json` and the MLflow UI keep all of it)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def rollout_lines(info: dict | None) -> list[str]:
    """A canary in a few lines: who, how much, what the guard rails see, what comes next."""
    if info is None:
        return ["rollout: none yet (`mlops rollout start VERSION`)"]
    head = (
        f"rollout #{info['seq']}: v{info['candidate']} at {info['fraction']:.0%} beside "
        f"v{info['champion']}, {info['state']}"
    )
    if info["state"] != "running":
        return [head, f"  {info.get('reason') or ''}"]
    figures = info.get("figures", {})
    lines = [head, f"  next: {info['decision']} ({'; '.join(info['reasons'])})"]
    for key, value in figures.items():
        lines.append(f"  {key}: {value:.4g}")
    return lines


def lineage_lines(info: dict) -> list[str]:
    """A prediction traced back to its data, one hop a line."""
    p, m, r, c, d = info["prediction"], info["model"], info["run"], info["code"], info["data"]
    truth = "" if p["true_label"] is None else f" (ground truth {p['true_label']})"
    lines = [
        f"prediction {p['id']}: label {p['label']}{truth}",
        f"  -> model     {m['name']} v{m['version']}  ({m['source']})",
        f"  -> MLflow run {r['id']}  test accuracy {r['test_accuracy']}",
        f"  -> git commit {c['git_commit']}{' (dirty)' if c['git_dirty'] == 'true' else ''}",
        f"  -> data       {d['hash']}  (source {d['source']}"
        + (f", contents md5 {d['source_hash']})" if d.get("source_hash") else ")"),
    ]
    lines += [f"       {key}: {value}" for key, value in d["where"].items()]
    return lines
