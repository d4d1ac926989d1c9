from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from core.types import AdapterWeight, Rejection
from storage import catalog, jobs
from storage.db import utcnow


def _add(session: Session, name: str, **kw):
    fields = dict(method="lora", kind="subject", base_model="tiny-sd", sha256="a" * 64, file_size=123)
    fields.update(kw)
    fields.setdefault("file_path", f"imports/{name}.safetensors")
    return catalog.add_adapter(session, name=name, **fields)


def _names(rows) -> list[str]:
    return sorted(r.name for r in rows)


@pytest.fixture
def populated(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    with sessions.begin() as session:
        _add(session, "Corgi", trigger_words=["sks dog"], tags=["Pets", " dogs ", "pets"])
        _add(session, "Watercolor", kind="style", method="tlora", trigger_words=["wtrclr"], tags=["painting"])
        _add(session, "Walk cycle", kind="motion", method="motion_lora", tags=["Animation"])
    return sessions


def test_add_and_get(sessions) -> None:
    with sessions.begin() as session:
        dataset = catalog.add_dataset(session, "  corgis ")
        job = jobs.enqueue(session, "train", {}, "t")
        row = _add(
            session,
            "Corgi",
            trigger_words=["sks"],
            rank=8,
            training_config={"lr": 1e-4},
            steps=500,
            dataset_id=dataset.id,
            job_id=job.id,
            previews=["adapters/x/previews/0.png"],
        )
        adapter_id = row.id
    with sessions() as session:
        for key in (adapter_id, "Corgi", "corgi", " CORGI "):
            assert catalog.get_adapter(session, key).id == adapter_id
        info = catalog.adapter_info(catalog.get_adapter(session, adapter_id))
    assert (info.name, info.method, info.kind, info.rank, info.steps) == ("Corgi", "lora", "subject", 8, 500)
    assert info.trigger_words == ("sks",) and info.training_config == {"lr": 1e-4}
    assert info.preview_paths == ("adapters/x/previews/0.png",) and info.tags == ()
    assert info.created_at.tzinfo is not None and info.deleted_at is None


def test_name_collisions(sessions) -> None:
    with sessions.begin() as session:
        _add(session, "Corgi")
    with sessions.begin() as session:
        with pytest.raises(ValueError, match="an adapter named 'Corgi' already exists"):
            _add(session, "corgi")
        with pytest.raises(ValueError, match="needs a name"):
            _add(session, "   ")
        with pytest.raises(ValueError, match="unknown adapter kind 'person'"):
            _add(session, "x", kind="person")


def test_get_unknown_adapter(sessions) -> None:
    with sessions() as session, pytest.raises(KeyError, match="no adapter with id or name 'ghost'"):
        catalog.get_adapter(session, "ghost")
    with sessions() as session:
        assert catalog.find_adapter(session, "ghost") is None


def test_search_and_tags(populated) -> None:
    with populated() as session:
        assert _names(catalog.list_adapters(session)) == ["Corgi", "Walk cycle", "Watercolor"]
        assert _names(catalog.list_adapters(session, search="WATER")) == ["Watercolor"]  # name
        assert _names(catalog.list_adapters(session, search="sks")) == ["Corgi"]  # trigger word
        assert _names(catalog.list_adapters(session, search="TLoRA")) == ["Watercolor"]  # method
        assert _names(catalog.list_adapters(session, search="anim")) == ["Walk cycle"]  # tag
        assert _names(catalog.list_adapters(session, search="%")) == []  # wildcards are literal
        assert _names(catalog.list_adapters(session, search="  ")) == ["Corgi", "Walk cycle", "Watercolor"]
        assert _names(catalog.list_adapters(session, tag=" PETS")) == ["Corgi"]
        assert _names(catalog.list_adapters(session, tag="pet")) == []  # tags match exactly
        assert _names(catalog.list_adapters(session, search="w", tag="painting")) == ["Watercolor"]
        corgi = catalog.get_adapter(session, "corgi")
        assert [t.name for t in corgi.tags] == ["dogs", "pets"]
        assert catalog.list_tags(session) == ["animation", "dogs", "painting", "pets"]


def test_set_tags(populated) -> None:
    with populated.begin() as session:
        row = catalog.set_tags(session, "Corgi", ["Good Boy", "good  boy", "", "Fluffy"])
        assert [t.name for t in row.tags] == ["fluffy", "good boy"]
        before = row.updated_at
    with populated.begin() as session:
        catalog.set_tags(session, "Watercolor", ["fluffy"])  # reuses the existing tag
        assert catalog.list_tags(session) == ["animation", "fluffy", "good boy"]
        assert catalog.get_adapter(session, "corgi").updated_at >= before
        with pytest.raises(ValueError, match="limited to 64 characters"):
            catalog.set_tags(session, "Corgi", ["x" * 65])
    assert catalog.normalize_tags([" A ", "a", "B  c", "\t"]) == ["a", "b c"]


def test_rename(populated) -> None:
    with populated.begin() as session:
        row = catalog.rename_adapter(session, "corgi", "  Corgi v2 ")
        assert row.name == "Corgi v2"
        assert catalog.rename_adapter(session, row.id, "CORGI V2").name == "CORGI V2"  # case change of itself
        with pytest.raises(ValueError, match="already exists"):
            catalog.rename_adapter(session, row.id, "watercolor")
    with populated() as session:
        assert catalog.get_adapter(session, "corgi v2").name == "CORGI V2"


def test_soft_delete_restore_purge(populated) -> None:
    with populated.begin() as session:
        row = catalog.soft_delete_adapter(session, "Corgi")
        assert row.deleted_at is not None
        corgi_id = row.id
    with populated.begin() as session:
        assert _names(catalog.list_adapters(session)) == ["Walk cycle", "Watercolor"]
        assert _names(catalog.list_adapters(session, include_deleted=True)) == ["Corgi", "Walk cycle", "Watercolor"]
        assert catalog.list_tags(session) == ["animation", "painting"]
        with pytest.raises(KeyError):
            catalog.get_adapter(session, "Corgi")
        assert catalog.get_adapter(session, "Corgi", include_deleted=True).id == corgi_id
        with pytest.raises(ValueError, match="in the trash"):
            _add(session, "corgi")
        assert catalog.adapter_info(catalog.restore_adapter(session, corgi_id)).deleted is False
        assert catalog.get_adapter(session, "Corgi").id == corgi_id

    with populated.begin() as session:
        catalog.soft_delete_adapter(session, "Corgi")
        stored = _add(session, "Stored", file_path="adapters/PLACEHOLDER/adapter.safetensors")
        stored.file_path = f"adapters/{stored.id}/adapter.safetensors"
        catalog.soft_delete_adapter(session, "Stored")
        stored_id = stored.id
    with populated.begin() as session:
        assert catalog.purge_deleted(session, older_than=utcnow() - timedelta(hours=1)) == []  # too recent
        paths = catalog.purge_deleted(session, older_than=utcnow() + timedelta(seconds=1))
    assert sorted(paths) == sorted(["imports/Corgi.safetensors", f"adapters/{stored_id}"])
    with populated() as session:
        assert _names(catalog.list_adapters(session, include_deleted=True)) == ["Walk cycle", "Watercolor"]
        assert catalog.purge_deleted(session, older_than=timedelta(0)) == []


def test_datasets(sessions) -> None:
    with sessions.begin() as session:
        row = catalog.add_dataset(session, "corgis")
        for i in (1, 0):
            catalog.add_dataset_image(
                session,
                row.id,
                position=i,
                filename=f"IMG_{i}.jpg",
                path=f"datasets/{row.id}/{i:04d}.png",
                width=64,
                height=48,
                sha256=str(i) * 64,
                caption=None if i else "a corgi",
            )
        info = catalog.dataset_info(row, rejected=[Rejection("bad.gif", "not an image")])
        dataset_id = row.id
    assert info.image_count == 2 and info.rejected[0].filename == "bad.gif"
    with sessions() as session:
        (listed,) = catalog.list_datasets(session)
        assert [img.position for img in listed.images] == [0, 1]
        assert listed.images[0].caption == "a corgi"
        assert catalog.dataset_info(listed).image_count == 2
        with pytest.raises(KeyError, match="no dataset"):
            catalog.get_dataset(session, "nope")
        with pytest.raises(KeyError):
            catalog.add_dataset_image(
                session, "nope", position=0, filename="x", path="x", width=1, height=1, sha256="0"
            )
    with sessions() as session:
        assert catalog.get_dataset(session, dataset_id).name == "corgis"


def test_images(populated) -> None:
    with populated.begin() as session:
        corgi = catalog.get_adapter(session, "corgi")
        style = catalog.get_adapter(session, "watercolor")
        job = jobs.enqueue(session, "generate", {}, "g")
        base = utcnow()
        for i in range(4):
            adapters = [{"adapter": corgi.id, "name": corgi.name, "weight": 0.8}] if i % 2 == 0 else []
            adapters.append(AdapterWeight(style.id, 0.5, prompt="watercolor" if i == 3 else ""))
            catalog.add_image(
                session,
                id=f"img{i}",
                path=f"images/x/img{i}.png",
                prompt=f"p{i}",
                seed=2**40 + i,
                sha256="0" * 64,
                adapters=adapters,
                composer="switch",
                params={"steps": 4},
                job_id=job.id,
                created_at=base + timedelta(seconds=i),
            )
        corgi_id = corgi.id
    with populated() as session:
        assert [r.id for r in catalog.list_images(session)] == ["img3", "img2", "img1", "img0"]
        assert [r.id for r in catalog.list_images(session, limit=2)] == ["img3", "img2"]
        words = [a.prompt for a in catalog.image_info(catalog.get_image(session, "img3")).adapters]
        assert words == ["watercolor"]  # a CLoRA concept word survives the round trip
        assert [r.id for r in catalog.list_images(session, adapter_id=corgi_id)] == ["img2", "img0"]
        assert [r.id for r in catalog.list_images(session, limit=1, adapter_id=corgi_id)] == ["img2"]
        assert catalog.list_images(session, adapter_id="nobody") == []
        info = catalog.image_info(catalog.get_image(session, "img0"))
        assert info.adapters == (AdapterWeight(corgi_id, 0.8), AdapterWeight(info.adapters[1].adapter, 0.5))
        assert (info.seed, info.composer, info.params, info.job_id) == (2**40, "switch", {"steps": 4}, job.id)
        assert catalog.get_image(session, "img0").adapters[0]["name"] == "Corgi"
        with pytest.raises(KeyError, match="no image"):
            catalog.get_image(session, "nope")
