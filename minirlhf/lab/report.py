"""What a lab experiment writes besides results.json: markdown tables and matplotlib figures (saved with ``save``).

matplotlib is optional (the ``plot`` extra): without it an experiment writes its numbers and its
report, and the report says that the figures need matplotlib.
"""
import os

NO_MATPLOTLIB = "no figures: matplotlib is not installed (pip install 'minirlhf[plot]' or pip install matplotlib)"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def markdown_table(header, rows):
    """A markdown table; floats printed with 3 decimals."""
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save(fig, out, name):
    """Write ``fig`` to ``out/name`` and close it; returns the path."""
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def finish(out, results, start, plot):
    """The end of every experiment: its time, ``out/results.json``, its figure; returns the results."""
    import time
    from ..train.stages import write_json
    results["seconds"] = time.time() - start
    write_json(os.path.join(out, "results.json"), results)
    plot(results, out)
    return results
