"""The admin console's charts, drawn server-side by pygal as SVG.

pygal (a maintained, pure-Python library with no dependencies of its own) renders each chart
on the server, so the pages need no chart JavaScript and nothing from a CDN; the SVG is shown
as an ``<img>`` from a ``data:`` URL, where no script of the SVG's can run and whatever text
it holds (a dish name, a version name) cannot reach the page.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence

import pygal
from pygal.style import Style

WIDTH, HEIGHT = 720, 280
_STYLE = Style(
    background="#ffffff",
    plot_background="#ffffff",
    colors=("#c2410c", "#2563eb", "#16a34a", "#7c3aed"),
    font_family="system-ui, sans-serif",
)


def _config() -> dict[str, object]:
    return {
        "js": [],  # no script from pygal's site: the console works offline
        "disable_xml_declaration": True,
        "width": WIDTH,
        "height": HEIGHT,
        "style": _STYLE,
        "legend_at_bottom": True,
        "truncate_label": 12,
    }


def as_image(svg: str) -> str:
    """An SVG as a ``data:`` URL for an ``<img>``."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def loss_curve(points: Sequence[tuple[int, float]], title: str) -> str:
    """The training loss by iteration, as a ``data:`` URL."""
    chart = pygal.XY(title=title, show_legend=False, dots_size=2, **_config())
    chart.add(title, list(points))
    return as_image(chart.render(is_unicode=True))


def lines(title: str, labels: Sequence[str], series: Mapping[str, Sequence[float | None]]) -> str:
    """One line per series over ``labels`` (days, say), as a ``data:`` URL."""
    chart = pygal.Line(title=title, x_label_rotation=30, **_config())
    chart.x_labels = list(labels)
    for name, values in series.items():
        chart.add(name, list(values))
    return as_image(chart.render(is_unicode=True))


def bars(title: str, labels: Sequence[str], series: Mapping[str, Sequence[float | None]]) -> str:
    """Grouped bars, one group per label, as a ``data:`` URL."""
    chart = pygal.Bar(title=title, **_config())
    chart.x_labels = list(labels)
    for name, values in series.items():
        chart.add(name, list(values))
    return as_image(chart.render(is_unicode=True))
