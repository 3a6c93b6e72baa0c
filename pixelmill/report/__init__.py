"""Self-contained HTML contact sheets of pixelmill datasets.

A report shows what a dataset actually holds: its manifest (schema, config, shard and
reject counts), summary statistics of its float metrics, the first rows with every image
column as a thumbnail side by side and the other columns as a compact list, and the
rejected rows with their reasons. Thumbnails are embedded as base64 data URIs and the CSS
is inline, so the single ``.html`` file can be mailed, archived or opened offline.

The package is split by report: :mod:`~pixelmill.report.dataset` (dataset contact
sheets, :func:`render_report` and :func:`render_multi_report`),
:mod:`~pixelmill.report.campaign` (fine-tuning campaigns), :mod:`~pixelmill.report.video`
(video edits), all drawn in the page shell of :mod:`~pixelmill.report.html`.
"""

from __future__ import annotations

from pixelmill.report.campaign import render_campaign_report
from pixelmill.report.dataset import (
    HASH_CHARS,
    MAX_REJECTS_SHOWN,
    MAX_SOURCE_PIXELS,
    MAX_TEXT_CHARS,
    MAX_VALUE_CHARS,
    REPORT_NAME,
    SHORT_TEXT_CHARS,
    THUMB_SIDE,
    is_image_type,
    render_multi_report,
    render_report,
)
from pixelmill.report.video import render_video_report

__all__ = [
    "HASH_CHARS",
    "MAX_REJECTS_SHOWN",
    "MAX_SOURCE_PIXELS",
    "MAX_TEXT_CHARS",
    "MAX_VALUE_CHARS",
    "REPORT_NAME",
    "SHORT_TEXT_CHARS",
    "THUMB_SIDE",
    "is_image_type",
    "render_campaign_report",
    "render_multi_report",
    "render_report",
    "render_video_report",
]
