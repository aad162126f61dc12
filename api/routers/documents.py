"""Uploads and their ingestion: ``POST /documents`` (202 and a job), ``GET /documents/jobs/{id}``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, File, UploadFile
from fastapi.responses import JSONResponse

from api.errors import error_response
from api.json_body import JSONRoute
from api.settings import Settings
from api.state import AppStateDep
from shm_model import errors
from tablerag.documents import SUPPORTED
from tablerag.jobs import Jobs, safe_name

router = APIRouter(route_class=JSONRoute)


def store_uploads(settings: Settings, files: list[UploadFile]) -> tuple[str, list[str], dict[str, str]]:
    """Each file in a folder of its own (same names never collide; the stored file keeps the
    uploader's name, shortened, for citations). Returns the folder, the paths, their names."""
    folder = tempfile.mkdtemp(prefix="upload-", dir=_ensure(settings.upload_dir))
    try:
        saved, names = [], {}
        for n, upload_file in enumerate(files):
            name = safe_name(upload_file.filename or "")
            if Path(name).suffix.lower() not in SUPPORTED:
                raise errors.BadRequest(f"{name}: unsupported file type; supported: {', '.join(SUPPORTED)}")
            path = Path(folder) / str(n) / name
            path.parent.mkdir()
            with open(path, "wb") as out:
                upload_file.file.seek(0)
                shutil.copyfileobj(upload_file.file, out, 1 << 20)
            saved.append(str(path))
            names[os.path.realpath(path)] = name
        return folder, saved, names
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


@router.post("/documents", status_code=202)
async def upload(api: AppStateDep, files: list[UploadFile] = File(...)) -> dict[str, Any]:  # noqa: B008 (FastAPI's idiom)
    if not files:
        raise errors.BadRequest("no files in the upload")
    jobs: Jobs = api.jobs
    jobs.check_room()
    folder, saved, names = await anyio.to_thread.run_sync(store_uploads, api.settings, files)
    try:
        job = jobs.submit(saved, folder=folder, names=names)
    except errors.Overloaded:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return {"job": job.id, "status_url": f"/documents/jobs/{job.id}", "files": list(names.values())}


@router.get("/documents/jobs/{job_id}")
def job_status(job_id: str, api: AppStateDep) -> JSONResponse:
    job = api.jobs.jobs.get(job_id)
    if job is None:
        return error_response(404, "not_found", f"no ingestion job {job_id[:40]!r}")
    return JSONResponse(job.to_dict())


def _ensure(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    return folder
