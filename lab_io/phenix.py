"""PerkinElmer Phenix / Opera image file names: ``r07c01f01p01-ch1sk1fk1fl1.tiff``.

``r`` row (1-based, A = 1), ``c`` column (1-based), ``f`` field (site), ``p`` focal plane,
``ch`` channel number, ``sk``/``fk``/``fl`` time-point, flim and flow ids (always 1 here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lab_io.schema import N_COLS, N_ROWS, well_name

_NAME_RE = re.compile(
    r"^r(?P<row>\d{2})c(?P<col>\d{2})f(?P<field>\d{2,})p(?P<plane>\d{2,})"
    r"-ch(?P<channel>\d+)sk\d+fk\d+fl\d+\.tiff?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class PhenixKey:
    """Parsed Phenix file name; ``row``/``col`` 1-based, ``well`` canonical (``G01``)."""

    row: int
    col: int
    field: int
    plane: int
    channel: int
    well: str


def _check(name: str, value: int, low: int, high: int | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"Phenix {name} {value} out of range ({bound})")


def phenix_name(row: int, col: int, field: int, plane: int, channel: int) -> str:
    """1-based row/col (A01 = 1, 1) + field, plane, channel -> ``r07c01f01p01-ch1sk1fk1fl1.tiff``."""
    _check("row", row, 1, N_ROWS)
    _check("column", col, 1, N_COLS)
    _check("field", field, 1, 99)
    _check("plane", plane, 1, 99)
    _check("channel", channel, 1)
    return f"r{row:02d}c{col:02d}f{field:02d}p{plane:02d}-ch{channel}sk1fk1fl1.tiff"


def parse_phenix_name(name: str) -> PhenixKey:
    """Inverse of :func:`phenix_name` (accepts a path; ``.tif`` too). ValueError names the file."""
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    m = _NAME_RE.match(base)
    if not m:
        raise ValueError(f"{name!r} is not a Phenix image name (expected like r07c01f01p01-ch1sk1fk1fl1.tiff)")
    row, col = int(m["row"]), int(m["col"])
    field, plane, channel = int(m["field"]), int(m["plane"]), int(m["channel"])
    try:
        _check("row", row, 1, N_ROWS)
        _check("column", col, 1, N_COLS)
        _check("field", field, 1)
        _check("plane", plane, 1)
        _check("channel", channel, 1)
    except ValueError as err:
        raise ValueError(f"{name!r}: {err}") from None
    return PhenixKey(row=row, col=col, field=field, plane=plane, channel=channel, well=well_name(row - 1, col - 1))


HARMONY_NAMESPACE = "http://www.perkinelmer.com/PEHH/HarmonyV5"


def harmony_index_xml(barcode: str, images: list[tuple[str, int, int, int, int, int, str]]) -> str:
    """A Harmony export's image index (``Images/Index.idx.xml``) for ``images``: ``(file name, row,
    col, field, plane, channel, channel name)``, 1-based as in the file names. Holds what
    :func:`lab_io.results.harmony_channel_names` reads: each image's ``ChannelID`` and
    ``ChannelName``, and one ``Map`` ``Entry`` per channel."""
    from xml.sax.saxutils import escape

    lines = ['<?xml version="1.0" encoding="utf-8"?>',
             f'<EvaluationInputData xmlns="{HARMONY_NAMESPACE}" Version="1">',
             f"  <Plates><Plate><PlateID>{escape(barcode)}</PlateID></Plate></Plates>", "  <Images>"]
    channels: dict[int, str] = {}
    for name, row, col, field, plane, channel, channel_name in images:
        channels.setdefault(channel, channel_name)
        lines.append(f'    <Image Version="1"><id>{row:02d}{col:02d}K1F{field}P{plane}R{channel}</id>'
                     f"<URL>{escape(name)}</URL><Row>{row}</Row><Col>{col}</Col><FieldID>{field}</FieldID>"
                     f"<PlaneID>{plane}</PlaneID><ChannelID>{channel}</ChannelID>"
                     f"<ChannelName>{escape(channel_name)}</ChannelName></Image>")
    lines += ["  </Images>", "  <Maps><Map>"]
    lines += [f'    <Entry ChannelID="{c}"><ChannelName>{escape(n)}</ChannelName></Entry>'
              for c, n in sorted(channels.items())]
    lines += ["  </Map></Maps>", "</EvaluationInputData>", ""]
    return "\n".join(lines)
