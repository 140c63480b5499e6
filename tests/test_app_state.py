"""The web app's session state (diffedit/app_state.py): the cache's byte bound, stopping a session, the picture's
working sizes. Torch only: no gradio needed."""
import copy

import pytest
import torch
from PIL import Image

from diffedit.app_state import Cancelled, LRUCache, Session, _picture


def test_cache_stays_within_its_byte_limit_and_a_session_stops_on_request():
    cache = LRUCache(limit=1000)
    for i in range(5):
        cache.cached(i, lambda: torch.zeros(100))            # 400 bytes each
    assert cache.bytes <= 1000 and len(cache) == 2 and cache.has(4) and not cache.has(0)
    big = cache.cached("big", lambda: torch.zeros(1000))      # larger than the limit: returned, not kept
    assert big.numel() == 1000 and not cache.has("big")
    session = Session(limit=1000)
    session.cache.cached("x", lambda: torch.zeros(1))
    session.stop.set()
    with pytest.raises(Cancelled):
        session.check_stop()
    fresh = copy.deepcopy(session)                           # what gr.State does for each new browser session
    assert len(fresh.cache) == 0 and fresh.cache.limit == 1000 and not fresh.stop.is_set()
    fresh.check_stop()


def test_picture_working_sizes_and_their_keys():
    photo = _picture(Image.new("RGB", (451, 300), (200, 30, 30)))
    native, again, full = photo.at(64, 16), photo.at(64, 16), photo.at(None, 16)
    assert native.pil.size == (64, 48) and native.size == (451, 300) and native.pil is again.pil
    assert full.pil.size == (448, 304) and len({native.digest, full.digest, photo.digest}) == 3
    assert native.restore(Image.new("RGB", (64, 48))).size == (451, 300)
    assert photo.at(451, 1).pil is photo.original
