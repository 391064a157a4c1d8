"""Batches through shared memory (gpusmd/services/shm.py): slots filled by the ingest and
read by a worker without copies, their reuse and clean-up, and descriptors from the
link checked like any message."""
import os

import numpy as np
import pytest

from gpusmd.services.ingest import Batch
from gpusmd.services.protocol import ProtocolError, decode
from gpusmd.services.shm import PREFIX, SlotPool, SlotReader, host_key, remove_stale

LAYOUT = {"jf": (np.dtype(np.uint16), (1, 8, 16)), "cam": (np.dtype(np.float32), (4, 5))}


def frames(rng, n):
    return [{det: rng.integers(0, 1000, shape).astype(dtype) for det, (dtype, shape) in
             LAYOUT.items()} for _ in range(n)]


@pytest.fixture
def pool(tmp_path):
    p = SlotPool(tmp_path)
    yield p
    p.close()


def test_a_worker_reads_what_the_ingest_wrote(pool, tmp_path):
    events = frames(np.random.default_rng(0), 3)
    slot = pool.take(LAYOUT, capacity=4)
    for f in events:
        slot.add(f)
    arrays = SlotReader(tmp_path).arrays(slot.describe())
    assert set(arrays) == set(LAYOUT)
    for det in LAYOUT:
        assert arrays[det].shape == (3, *LAYOUT[det][1])
        np.testing.assert_array_equal(arrays[det], np.stack([f[det] for f in events]))
        assert not arrays[det].flags.writeable          # the worker only reads
    # the same batch for a worker on another host: one frame per event over the link
    header = {"kind": "batch", "run": 1, "batch": 0, "events": []}
    msg = decode(Batch(0, "token", header, [0, 1, 2], 0, slot=slot).message(shared=False))
    for i, f in enumerate(events):
        for det in LAYOUT:
            np.testing.assert_array_equal(msg.arrays[f"{i}/{det}"], f[det])


def test_slots_are_reused_and_removed(pool, tmp_path):
    a = pool.take(LAYOUT, 4)
    b = pool.take(LAYOUT, 4)
    assert a.path != b.path and a.path.exists() and b.path.exists()
    pool.give(a)
    assert pool.take(LAYOUT, 4) is a                    # no new file per batch
    pool.give(a)
    other = {"jf": (np.dtype(np.uint16), (2, 8, 16))}
    c = pool.take(other, 4)                             # a new run: old free slots go
    assert not a.path.exists() and c.path.exists()
    pool.close()
    assert not list(tmp_path.glob(f"{PREFIX}*"))


def test_a_worker_lets_go_of_removed_files(pool, tmp_path):
    reader = SlotReader(tmp_path)
    a, b = pool.take(LAYOUT, 1), pool.take(LAYOUT, 1)
    for slot in (a, b):
        slot.add(frames(np.random.default_rng(2), 1)[0])
    reader.arrays(a.describe())
    assert a.path.name in reader.maps
    a.close()                                   # an ingest that went away
    reader.arrays(b.describe())
    assert list(reader.maps) == [b.path.name]
    reader.close()


def test_slot_files_of_dead_ingests_are_removed(tmp_path):
    dead = tmp_path / f"{PREFIX}{2 ** 22 + 7}-0"         # above any pid of this machine
    alive = tmp_path / f"{PREFIX}{os.getpid()}-0"
    for path in (dead, alive):
        path.write_bytes(b"x")
    remove_stale(tmp_path)
    assert not dead.exists() and alive.exists()
    # a new pool of this process: a file with its own pid is a dead one's (pid reused)
    pool = SlotPool(tmp_path)
    assert not alive.exists()
    slot = pool.take(LAYOUT, 1)
    assert slot.path == alive                            # the name is free again
    pool.close()


@pytest.mark.parametrize("desc, problem", [
    ({"path": "passwd", "arrays": []}, "not a slot file"),
    ({"path": f"{PREFIX}1-0/../x", "arrays": []}, "not a slot file"),
    ({"path": f"{PREFIX}{2 ** 22 + 7}-9", "arrays": []}, "cannot map"),
    ("nonsense", "bad shared-memory batch descriptor"),
])
def test_bad_descriptors_are_refused(tmp_path, desc, problem):
    with pytest.raises(ProtocolError, match=problem):
        SlotReader(tmp_path).arrays(desc)


def test_arrays_outside_the_file_are_refused(pool, tmp_path):
    slot = pool.take(LAYOUT, 1)
    slot.add(frames(np.random.default_rng(1), 1)[0])
    desc = slot.describe()
    desc["arrays"][0][3] = 1 << 30
    with pytest.raises(ProtocolError, match="lies outside"):
        SlotReader(tmp_path).arrays(desc)
    desc["arrays"][0] = ["jf", "|O", [1], 0]
    with pytest.raises(ProtocolError, match="not allowed"):
        SlotReader(tmp_path).arrays(desc)


def test_host_key_names_boot_mount_and_user(tmp_path):
    key = host_key(tmp_path)
    assert key is not None and key.endswith(f":{os.getuid()}")
    assert key != host_key(tmp_path / "..")             # another directory, another key


def test_a_full_shared_memory_sends_the_batch_over_the_link(pool, tmp_path, monkeypatch):
    """No room in /dev/shm: no file is left behind, and the ingest sends that batch's
    frames over the link instead of stopping (a tmpfs page written past the limit would
    kill it with SIGBUS, hence the pages are taken when the slot is made)."""
    import errno
    from types import SimpleNamespace

    from gpusmd.services.ingest import Ingest
    from gpusmd.services.metrics import Metrics

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError):
        pool.take(LAYOUT, 4)
    assert not list(tmp_path.glob(f"{PREFIX}*"))
    model = SimpleNamespace(dtype=np.uint16, shape=(1, 8, 16))
    ingest = SimpleNamespace(slots=pool, batch_size=4, next_batch=3, workers={},
                             info=SimpleNamespace(detectors={"jf": model}),
                             metrics=Metrics("ingest", 60.0, None))
    assert Ingest.take_slot(ingest) is None
    assert ingest.metrics.get("shm_full") == 1
