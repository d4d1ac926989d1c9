"""A video method's preview clips become animated PNGs: the job's preview file and, through the usual save path, the
adapter's gallery preview (real SQLite, a real job row and lease, real files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.animation import decode_animation, is_animated
from services.adapter_records import NewAdapter, record_adapter
from services.training import _JobCallback
from services.worker import JobReporter
from storage import jobs
from storage.artifacts import ArtifactStore
from storage.db import open_database, writing
from training.artifact import adapter_file_metadata


def test_clip_previews_play_in_jobs_and_in_the_gallery(tmp_path: Path) -> None:
    _, sessions = open_database(f"sqlite:///{tmp_path / 'catalog.db'}")
    store = ArtifactStore(tmp_path / "artifacts")
    with writing(sessions) as session:
        job_id = jobs.enqueue(session, "train", {"kind": "motion"}, title="train clip").id
    assert jobs.claim_job(sessions, job_id, "w1") is not None
    callback = _JobCallback(JobReporter(sessions, job_id, "w1"), store, job_id, total=4)
    frames = [Image.new("RGB", (16, 16), (i * 60, 30, 200)) for i in range(4)]
    strip = Image.new("RGB", (64, 16))
    for i, frame in enumerate(frames):
        strip.paste(frame, (16 * i, 0))
    callback.on_preview(2, strip)
    callback.on_preview_frames(2, frames)

    (path,) = callback.previews
    data = path.read_bytes()
    assert is_animated(data)
    np.testing.assert_array_equal(decode_animation(data), np.stack([np.asarray(f) for f in frames]))
    with sessions.begin() as session:
        assert jobs.job_info(jobs.get_job(session, job_id)).progress.preview_path == str(path)

    spec = NewAdapter(name="clip", method="lora", kind="motion", base_model="builtin:tiny-video",
                      base_model_hash="0" * 16, trigger_words=[], rank=1, training_config={}, steps=2,
                      previews=[p.read_bytes() for p in callback.previews[-1:]])
    tensors = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(1, 64),
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 1)}
    metadata = adapter_file_metadata("lora", {"rank": 1}, "builtin:tiny-video", "0" * 16, [], "motion", 2)
    adapter = record_adapter(sessions, store, "clip-adapter", spec, tensors, metadata)
    assert is_animated(store.resolve(adapter.preview_paths[0]).read_bytes())
