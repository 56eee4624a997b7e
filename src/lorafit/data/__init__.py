"""The data layer: read sources in any format, check, tokenise with labels (cached), mix, pack, audit.
May use: errors, hashing, run_folder, config.

One entry prepares any objective's rows: ``lorafit.data.prepare`` (data/prepare.py). The supervised pipeline is in
data/supervised.py, what every preparation returns in data/prepared.py; the names below are kept importable from
the package for the Python API.
"""

from __future__ import annotations

from lorafit.data.labels import IGNORE_INDEX
from lorafit.data.prepared import PreparedData, SplitStats, length_notes
from lorafit.data.supervised import TokenizedDataset, load_source, prepare_data
from lorafit.data.templates import use_configured_template

__all__ = ["IGNORE_INDEX", "PreparedData", "SplitStats", "TokenizedDataset", "length_notes", "load_source",
           "prepare_data", "use_configured_template"]
