"""The composition root: the only place where concrete classes are built and wired together."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.devices import choose_placement
from core.types import DatasetInfo, GenerationRequest, JobInfo
from services.catalog import CatalogService
from services.datasets import DatasetService
from services.generation import GenerationService
from services.jobs import JobService
from services.runtime import ModelRuntime
from services.settings import Settings
from services.training import TrainingService
from services.worker import Worker, default_worker_id
from storage.artifacts import ArtifactStore
from storage.db import open_database


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

    def submit_training(self, **kwargs) -> JobInfo:
        job = self.training.submit(**kwargs)
        self.worker.wake()
        return job

    def train_from_upload(self, files: list, **settings) -> tuple[DatasetInfo, JobInfo]:
        """Check the settings, store the upload as a dataset, queue the training job."""
        self.training.check(**settings)
        dataset = self.datasets.create_dataset(settings["name"], files)
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
    store = ArtifactStore(settings.artifacts_dir)
    store.remove_orphans()
    runtime = ModelRuntime(settings.models_dir, choose_placement(settings.device, settings.dtype),
                           single_file_config=settings.base_model_config)
    datasets = DatasetService(sessions, store)
    training = TrainingService(sessions, store, runtime, datasets.training_records, settings.base_model)
    generation = GenerationService(sessions, store, runtime, settings.base_model)
    catalog = CatalogService(sessions, store)
    worker = Worker(
        sessions,
        {"train": training.run_train_job, "generate": generation.run_generate_job},
        worker_id=settings.worker_id or default_worker_id(worker_suffix),
        lease_seconds=settings.lease_seconds,
        heartbeat_seconds=settings.heartbeat_seconds,
        poll_seconds=settings.poll_seconds,
    )
    jobs = JobService(sessions, wake_worker=worker.wake)
    return Services(settings, engine, sessions, runtime, datasets, training, generation, catalog, jobs, worker)
