"""The composition root: the only place where concrete classes are built and wired together."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.devices import choose_placement, device_memory_gb
from core.types import DatasetInfo, GenerationRequest, JobInfo
from services.catalog import CatalogService
from services.datasets import DatasetService
from services.generation import GenerationService
from services.interchange import InterchangeService
from services.jobs import JobService
from services.runtime import ModelRuntime
from services.settings import Settings
from services.training import TrainingService
from services.worker import Worker, default_worker_id
from storage.db import open_database
from storage.remote import make_artifact_store

# Temp files younger than this may belong to a write in progress in another process (a worker on this data dir).
ORPHAN_MIN_AGE_S = 15 * 60


@dataclass(frozen=True)
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    runtime: ModelRuntime
    datasets: DatasetService
    training: TrainingService
    generation: GenerationService
    catalog: CatalogService
    jobs: JobService
    worker: Worker
    interchange: InterchangeService

    def submit_training(self, **kwargs) -> JobInfo:
        job = self.training.submit(**kwargs)
        self.worker.wake()
        return job

    def train_from_upload(self, files: list, **settings) -> tuple[DatasetInfo, JobInfo]:
        """Check the settings, store the upload as a dataset (clips for a motion, at the config's frame count and
        resolution), queue the training job."""
        checked = self.training.check(**settings)
        config = checked["config"]
        dataset = self.datasets.create_dataset(settings["name"], files, kind=checked["kind"],
                                               frames=config.get("num_frames"), size=config.get("resolution"))
        return dataset, self.submit_training(dataset_id=dataset.id, **settings)

    def submit_generation(self, request: GenerationRequest) -> JobInfo:
        job = self.generation.submit(request)
        self.worker.wake()
        return job

    def close(self) -> None:
        self.worker.stop()
        self.runtime.release()
        self.engine.dispose()


def build_services(settings: Settings, worker_suffix: str = "builtin") -> Services:
    """Open the database (migrating it), the artifact store and the model runtime; nothing starts running."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine, sessions = open_database(settings.database_url)
    store = make_artifact_store(settings.artifacts_dir, settings.artifact_url)
    store.remove_orphans(min_age_s=ORPHAN_MIN_AGE_S)
    runtime = ModelRuntime(settings.models_dir, choose_placement(settings.device, settings.dtype),
                           single_file_config=settings.base_model_config)
    datasets = DatasetService(sessions, store)
    training = TrainingService(sessions, store, runtime, datasets.training_records, settings.base_model,
                               clip_records=datasets.clip_records)
    generation = GenerationService(sessions, store, runtime, settings.base_model)
    catalog = CatalogService(sessions, store)
    interchange = InterchangeService(sessions, store, runtime, settings.base_model)
    worker = Worker(
        sessions,
        {"train": training.run_train_job, "generate": generation.run_generate_job,
         "import": interchange.run_import_job},
        worker_id=settings.worker_id or default_worker_id(worker_suffix),
        lease_seconds=settings.lease_seconds,
        heartbeat_seconds=settings.heartbeat_seconds,
        poll_seconds=settings.poll_seconds,
    )
    jobs = JobService(sessions, wake_worker=worker.wake)
    return Services(settings, engine, sessions, runtime, datasets, training, generation, catalog, jobs, worker,
                    interchange)


@dataclass(frozen=True)
class DeviceWorker:
    """One worker thread bound to one device, with its own model runtime."""

    device: str
    runtime: ModelRuntime
    worker: Worker


def build_device_workers(services: Services, devices: list[str], memory_gb: float | None = None,
                         worker_id: str | None = None) -> list[DeviceWorker]:
    """One :class:`Worker` per entry of ``devices`` (``cpu``, ``cuda:0`` ...; repeats allowed), each with its own
    placement and runtime. A worker claims only jobs whose ``min_gpu_memory_gb`` its device meets (``memory_gb``
    overrides the measured memory: GPU memory, or system RAM for the CPU)."""
    if not devices:
        raise ValueError("give at least one device, e.g. --devices cpu or --devices cuda:0,cuda:1")
    settings = services.settings
    base_id = worker_id or services.worker.worker_id
    built: list[DeviceWorker] = []
    store = make_artifact_store(settings.artifacts_dir, settings.artifact_url)
    for index, device in enumerate(devices):
        placement = choose_placement(device, settings.dtype)
        runtime = ModelRuntime(settings.models_dir, placement, single_file_config=settings.base_model_config)
        training = TrainingService(services.sessions, store, runtime, services.datasets.training_records,
                                   settings.base_model, clip_records=services.datasets.clip_records)
        generation = GenerationService(services.sessions, store, runtime, settings.base_model)
        interchange = InterchangeService(services.sessions, store, runtime, settings.base_model)
        worker = Worker(
            services.sessions,
            {"train": training.run_train_job, "generate": generation.run_generate_job,
             "import": interchange.run_import_job},
            worker_id=f"{base_id}/{index}:{placement.device}",
            lease_seconds=settings.lease_seconds,
            heartbeat_seconds=settings.heartbeat_seconds,
            poll_seconds=settings.poll_seconds,
            memory_gb=memory_gb if memory_gb is not None else device_memory_gb(placement.device),
        )
        built.append(DeviceWorker(device, runtime, worker))
    return built
