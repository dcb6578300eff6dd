"""The path helpers of `data.paths` under their older import path (`from mqt import paths`).

Local paths and cloud URIs (gs://, s3://, az://, hf://) through etils.epath; see
data/paths.py. The helpers live there so that data/ imports nothing from mqt/. To
replace one in a test (monkeypatch), patch `data.paths`: the functions here are
the same objects and look their helpers up in that module.
"""
from data.paths import *  # pylint: disable=wildcard-import,unused-wildcard-import
# The private helpers too, for callers that reached them here.
from data.paths import (  # pylint: disable=unused-import
    _epath, _missing_backend, _need_backend, _scheme, _supported)
