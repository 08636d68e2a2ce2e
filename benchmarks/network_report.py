"""The network benchmark's result (`network_benchmark.benchmark_network`) as text: one Markdown
table and a line per link of how much sooner one method finishes than another."""


def _cell(value, digits):
    return "not reached" if value is None else f"{value:,.{digits}f}"


def markdown_table(result):
    """The rows as one Markdown table (ready for docs/results.md)."""
    lines = [
        "| link | method | shaping | payload MB up | payload MB down | training wall s "
        "(process) | fit s (records) | time to target s (fit) | final accuracy |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_link = {entry["name"]: entry for entry in result["links"]}
    for row in result["rows"]:
        link = by_link[row["link"]]
        name = f"{row['link']} ({link['rate_mbit']:g} Mbit/s, {link['rtt_ms']:g} ms)"
        method = row["method"] + (" *" if row.get("note") else "")
        if "error" in row:
            cells = [name, method, row["shaping"], f"failed: {row['error']}", "", "", "", "", ""]
        else:
            cells = [
                name,
                method,
                row["shaping"],
                f"{row['payload_mb_up']:.2f}",
                f"{row['payload_mb_down']:.2f}",
                f"{row['process_seconds']:.1f}",
                f"{row['fit_seconds']:.1f}",
                _cell(row["seconds_to_target"], 1),
                f"{100 * row['final_test_accuracy']:.2f}%",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speedups(result, fast="deprune", slow="sl"):
    """A line per link: how much sooner `fast` finishes than `slow` (device process times)."""
    lines = []
    for entry in result["links"]:
        times = {
            row["method"]: row["process_seconds"]
            for row in result["rows"]
            if row["link"] == entry["name"] and "error" not in row
        }
        if fast in times and slow in times:
            ratio, when = times[slow] / times[fast], "sooner"
            if ratio < 1:
                ratio, when = 1 / ratio, "later"
            lines.append(
                f"{entry['name']}: {fast} finishes {ratio:.2f}x {when} than {slow.upper()} "
                f"({times[fast]:.1f} s vs {times[slow]:.1f} s)"
            )
    return lines
