"""Figures of the lab: matplotlib is optional, so an experiment without it still writes results.json."""
import os


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, out, name):
    """Write ``fig`` to ``out/name`` and close it; returns the path."""
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
