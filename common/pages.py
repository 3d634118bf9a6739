"""Self-contained HTML pages: plots and thumbnails embedded as data URIs, so a page opens from disk.

Every report (dataset, captions, training summary, preference page) is one static file that a
person can copy off a cluster and open in a browser with no server: no external scripts, styles
or images. Plots are matplotlib figures rendered with the Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: a page without plots loads neither
    import numpy.typing as npt
    from matplotlib.figure import Figure

THUMB_SIDE = 192  # px, longest side of a gallery thumbnail: ~8 KB as JPEG q80
THUMB_THREADS = 4  # threads decoding a page's thumbnails

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1280px;padding:0 16px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd} h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 10px;text-align:left}
th{background:#f4f4f4} td.n{text-align:right}
.plots{display:flex;flex-wrap:wrap;gap:12px} figure.plot{margin:0} figure.plot img{width:400px}
.gallery{display:flex;flex-wrap:wrap;gap:8px}
.tile{width:200px;font-size:11px;overflow-wrap:anywhere;border:1px solid #eee;padding:4px}
.tile img{max-width:192px;max-height:192px;display:block;margin:auto}
.tile.missing{background:#fafafa;color:#888}
.group{display:flex;gap:8px;padding:6px;margin:6px 0;border:1px solid #ddd}
.caption{font-size:12px;white-space:pre-wrap} .muted{color:#888}
.example{display:flex;gap:12px;border-bottom:1px solid #eee;padding:8px 0}
.example .text{flex:1} .tokens.over{color:#b00;font-weight:bold}
"""


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def page(title: str, body: str) -> str:
    """A whole HTML document with the shared style sheet inlined."""
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head>\n<body>\n<h1>{esc(title)}</h1>\n{body}\n</body></html>\n"
    )


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure_uri(fig: Figure) -> str:
    """A matplotlib Figure as a PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return data_uri(buf.getvalue(), "image/png")


def new_figure(width: float = 5.6, height: float = 3.4) -> Figure:
    """A Figure on the Agg canvas (headless; safe in threads and Ray workers, unlike pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def thumbnail_uri(data: bytes, side: int = THUMB_SIDE) -> str | None:
    """Encoded image bytes -> small JPEG data URI (EXIF orientation applied); None if undecodable."""
    from common import images

    try:
        im = images.upright_thumbnail(data, side)
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean "no thumbnail"
        return None
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return data_uri(buf.getvalue(), "image/jpeg")


def thumbnail_uris(found: dict[str, bytes], side: int = THUMB_SIDE) -> dict[str, str | None]:
    """`thumbnail_uri` of each value, decoded in a few threads."""
    return dict(zip(found, in_threads(lambda data: thumbnail_uri(data, side), list(found.values()))))


def in_threads(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """`fn` over `items` in THUMB_THREADS threads, results in order: image decoding (PIL, OpenCV)
    releases the GIL, so a page's thumbnails decode on several cores."""
    if not items:
        return []
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(THUMB_THREADS) as pool:
        return list(pool.map(fn, items))


def tar_images(path: str | Path, keys: set[str]) -> dict[str, bytes]:
    """{key: bytes} of the image members (KEY.jpg|png|webp) of the wanted keys in a curated tar."""
    from shards import curated
    from shards.format import IMAGE_EXTS

    found: dict[str, bytes] = {}
    for key, members in curated.samples(path, only=keys):
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if key in keys and image is not None:
            found[key] = image
    return found


def plot(name: str, uri: str, title: str) -> str:
    """One embedded plot; `data-plot` names it for tests and for links."""
    return f'<figure class="plot" data-plot="{esc(name)}"><img alt="{esc(title)}" src="{uri}"></figure>'


def finite(values: Iterable[float | None], log_x: bool = False) -> npt.NDArray[Any]:
    """The values a histogram counts, as a float array: finite ones, and only positive ones on a log axis."""
    import numpy as np

    v = np.asarray(values, dtype=float)  # None -> nan
    v = v[np.isfinite(v)]
    kept: npt.NDArray[Any] = v[v > 0] if log_x else v
    return kept


def histogram_edges(
    lo: float, hi: float, lines: Iterable[tuple[str, float]] = (), bins: int = 40, log_x: bool = False
) -> npt.NDArray[Any]:
    """Bin edges over the data's range [lo, hi] widened to the threshold lines.

    Spanning the lines keeps the bars visible when a line is far off; the one binning rule of
    every histogram, whether the values are in memory (`histogram`) or streamed (`histogram_counts`).
    """
    import numpy as np

    span = np.asarray([lo, hi, *[x for _, x in lines if x > 0 or not log_x]], dtype=float)
    lo, hi = span.min(), span.max()
    if hi <= lo:  # one distinct value
        lo, hi = (lo / 2, hi * 2) if log_x else (lo - 0.5, hi + 0.5)
    return np.geomspace(lo, hi, bins + 1) if log_x else np.linspace(lo, hi, bins + 1)


def histogram(
    name: str,
    values: Sequence[float],
    title: str,
    xlabel: str,
    lines: Iterable[tuple[str, float]] = (),
    bins: int = 40,
    log_x: bool = False,
    log_y: bool = False,
) -> str:
    """A histogram of values in memory, with labelled vertical threshold lines, as an embedded plot."""
    import numpy as np

    v = finite(values, log_x)
    lines = list(lines)
    if not len(v):
        return histogram_counts(name, None, None, title, xlabel, lines, log_x, log_y)
    edges = histogram_edges(v.min(), v.max(), lines, bins, log_x)
    return histogram_counts(name, edges, np.histogram(v, edges)[0], title, xlabel, lines, log_x, log_y)


def histogram_counts(
    name: str,
    edges: Any,  # an array of bin edges, or None
    counts: Any,  # an array or list of counts per bin, or None
    title: str,
    xlabel: str,
    lines: Iterable[tuple[str, float]] = (),
    log_x: bool = False,
    log_y: bool = False,
) -> str:
    """A histogram of counts already binned on `edges` (from `histogram_edges`), e.g. summed over
    the batches of a big file; edges None: "no values"."""
    fig = new_figure()
    ax = fig.add_subplot()
    lines = list(lines)
    n = 0
    if edges is not None:
        n = int(sum(counts))
        ax.hist(edges[:-1], bins=edges, weights=counts, color="#4c78a8")  # one value per bin, weighted
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    for i, (label, x) in enumerate(lines):
        ax.axvline(x, color=f"C{(i + 1) % 10}", linestyle="--", linewidth=1.5, label=f"{label} = {x:g}")
    if log_x:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    if log_y:
        ax.set_yscale("log")
    if lines:
        ax.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{title} (n={n:,})", fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    return plot(name, figure_uri(fig), title)


def bars(name: str, counts: dict[str, int], title: str, marked: str | None = None) -> str:
    """A bar chart of category counts; `marked` is outlined (e.g. the configured minimum tier)."""
    fig = new_figure()
    ax = fig.add_subplot()
    labels = list(counts)
    rects = ax.bar(labels, [counts[k] for k in labels], color="#4c78a8")
    if marked in counts:
        rects[labels.index(marked)].set(edgecolor="C3", linewidth=2.5, label=f"minimum = {marked}")
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("images")
    return plot(name, figure_uri(fig), title)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], name: str = "") -> str:
    """A plain HTML table; cells are escaped, numbers get thousands separators."""

    def cell(v: Any) -> str:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f'<td class="n">{v:,}</td>' if isinstance(v, int) else f'<td class="n">{v:g}</td>'
        return f"<td>{esc(v)}</td>"

    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f'<table data-table="{esc(name)}"><tr>{head}</tr>{body}</table>'


def tile(uri: str | None, lines: Sequence[str], key: str = "") -> str:
    """A gallery tile: thumbnail (or a placeholder when the bytes are not available) + text lines."""
    text = "<br>".join(esc(x) for x in lines)
    if uri is None:
        return f'<div class="tile missing" data-key="{esc(key)}"><div>(no thumbnail)</div>{text}</div>'
    return f'<div class="tile" data-key="{esc(key)}"><img alt="{esc(key)}" src="{uri}"><br>{text}</div>'


def gallery(name: str, title: str, tiles: list[str], total: int | None = None, note: str = "") -> str:
    """A titled gallery; `data-count` is how many tiles it shows, `data-total` how many exist."""
    total = len(tiles) if total is None else total
    shown = f"{len(tiles):,} of {total:,}" if total != len(tiles) else f"{total:,}"
    note = f' <span class="muted">{esc(note)}</span>' if note else ""
    return (
        f'<section class="gallery-block" data-gallery="{esc(name)}" data-count="{len(tiles)}" '
        f'data-total="{total}"><h3>{esc(title)} ({shown}){note}</h3>'
        f'<div class="gallery">{"".join(tiles)}</div></section>'
    )
