"""Seeding a route from an existing dataset (OpenAI fine-tuning JSONL): upload, list, delete.

The upload is streamed and size-limited; it is validated line by line and either imported
whole or not at all (gateway/imports.py). A new import can start a training job at once.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from gateway.errors import InvalidDataset, NotFound
from gateway.imports import Imports, validate_lines
from gateway.services import Services
from gateway.web.common import ROUTE_NAME, adaptive_controller, query_choice, read_capped, route_of
from gateway.web.endpoints import Endpoint, Param
from gateway.web.schemas import DatasetImport, DatasetList, DeletedImport

_IMPORT_ID = Param("import_id", "path", {"type": "string"}, "the import's id (from the upload's answer)")
_NAME = Param("name", "query", {"type": "string"}, "a label for the import (default: dataset)")
_HELDOUT = Param(
    "heldout",
    "query",
    {"type": "string", "enum": ["true", "false"]},
    "false: the pairs are only trained on, never used by the judge (default true)",
)


async def import_dataset(request: Request, services: Services) -> DatasetImport:
    route = route_of(services, request)
    controller = adaptive_controller(services, route)
    raw = await read_capped(request, services.settings.max_import_bytes)
    checked = await asyncio.to_thread(validate_lines, raw.splitlines())
    if checked.bad_lines or not checked.chats:
        message = (
            f"{checked.bad_lines} bad line(s); nothing was imported" if checked.bad_lines else "no pairs"
        )
        raise InvalidDataset(message, checked.errors)
    heldout = query_choice(request, "heldout", ("true", "false")) != "false"
    name = (request.query_params.get("name") or "dataset")[:200]
    imports = Imports(services.settings.data_dir)
    meta = await asyncio.to_thread(imports.save, route.name, checked.chats, name, heldout)
    controller.check_training(route.name)
    return DatasetImport.model_validate(meta)


async def list_datasets(request: Request, services: Services) -> DatasetList:
    route = route_of(services, request)
    imports = Imports(services.settings.data_dir)
    found = await asyncio.to_thread(imports.list, route.name)
    return DatasetList(data=[DatasetImport.model_validate(meta) for meta in found])


async def delete_dataset(request: Request, services: Services) -> DeletedImport:
    route = route_of(services, request)
    import_id = request.path_params["import_id"]
    imports = Imports(services.settings.data_dir)
    if not await asyncio.to_thread(imports.delete, route.name, import_id):
        raise NotFound(f"route {route.name!r} has no import {import_id[:64]!r}", code="import_not_found")
    return DeletedImport(id=import_id)


endpoints = [
    Endpoint(
        "POST",
        "/admin/routes/{name}/dataset",
        import_dataset,
        "Import OpenAI fine-tuning JSONL as training pairs: every bad line is reported, or all is imported",
        DatasetImport,
        status=201,
        params=(ROUTE_NAME, _NAME, _HELDOUT),
        errors=(400, 404, 409, 413, 422),
        upload=(
            "text/plain",  # JSONL; any content type is read the same
            {"type": "string", "minLength": 1, "description": 'one {"messages": [...]} chat a line'},
        ),
    ),
    Endpoint(
        "GET",
        "/admin/routes/{name}/datasets",
        list_datasets,
        "The route's imported datasets",
        DatasetList,
        params=(ROUTE_NAME,),
        errors=(404,),
    ),
    Endpoint(
        "DELETE",
        "/admin/routes/{name}/datasets/{import_id}",
        delete_dataset,
        "Delete an imported dataset (adapters already trained on it keep what they learned)",
        DeletedImport,
        params=(ROUTE_NAME, _IMPORT_ID),
        errors=(404,),
    ),
]
