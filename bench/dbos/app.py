"""The counter workload of cnsm's http_load bench as a DBOS app (DBOS Transact 3.x, FastAPI).

One instance = one row of `counters` (state name, counter n, version) in the application
database. `POST /instances/{id}/events {"event":"inc"}` runs one DBOS workflow whose single step
is a database transaction on a DBOS datasource: read the row (locked), check the event is
allowed in its state, write the new state (n + 1, version + 1). DBOS checkpoints the workflow
(status, the step's output in the same transaction as the step) in its system database on the
same PostgreSQL; the answer is sent after the workflow has finished, so after every commit.
`POST /instances/{id}` creates an instance (setup, outside the measured phases).

Environment: DBOS_BENCH_DATABASE_URL (SQLAlchemy URL of the application database, also used as
the DBOS system database), DBOS_BENCH_PORT (default 0: any free port; the bound address is
printed as `listening on http://HOST:PORT`).
"""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy as sa
import uvicorn
from dbos import DBOS, DBOSConfig, SQLAlchemyDatasource
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

DATABASE_URL = os.environ["DBOS_BENCH_DATABASE_URL"]
# The same machine definition as cnsm's bench: one state, `inc` loops on it and adds 1 to n.
INITIAL_STATE = "counting"
TRANSITIONS = {("counting", "inc"): "counting"}


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    DBOS.launch()
    try:
        yield
    finally:
        DBOS.destroy()


app = FastAPI(lifespan=lifespan)
DBOS(
    config={
        "name": "cnsm-bench-counter",
        "system_database_url": DATABASE_URL,
        "log_level": "WARNING",
    }
)
# Pool as large as DBOS's system database pool (20), so neither side starves the other.
db = SQLAlchemyDatasource.create(
    DATABASE_URL, engine_kwargs={"pool_size": 20, "max_overflow": 0}
)

with sa.create_engine(DATABASE_URL).begin() as conn:
    conn.execute(
        sa.text(
            "CREATE TABLE IF NOT EXISTS counters ("
            " id text PRIMARY KEY, state text NOT NULL, n bigint NOT NULL, version bigint NOT NULL)"
        )
    )


@db.transaction(isolation_level="READ COMMITTED")
def create_row(instance: str) -> bool:
    inserted = db.sql_session().execute(
        sa.text(
            "INSERT INTO counters (id, state, n, version) VALUES (:id, :state, 0, 1)"
            " ON CONFLICT (id) DO NOTHING"
        ),
        {"id": instance, "state": INITIAL_STATE},
    )
    return inserted.rowcount == 1


@db.transaction(isolation_level="READ COMMITTED")
def transition(instance: str, event: str) -> dict:
    session = db.sql_session()
    row = session.execute(
        sa.text("SELECT state, n, version FROM counters WHERE id = :id FOR UPDATE"),
        {"id": instance},
    ).first()
    if row is None:
        return {"status": 404, "error": f"instance {instance} not found"}
    target = TRANSITIONS.get((row.state, event))
    if target is None:
        return {"status": 422, "error": f"no transition for {event} in state {row.state}"}
    session.execute(
        sa.text("UPDATE counters SET state = :state, n = :n, version = :version WHERE id = :id"),
        {"id": instance, "state": target, "n": row.n + 1, "version": row.version + 1},
    )
    return {"status": 200, "state": target, "n": row.n + 1, "version": row.version + 1}


@DBOS.workflow()
def create_workflow(instance: str) -> bool:
    return create_row(instance)


@DBOS.workflow()
def event_workflow(instance: str, event: str) -> dict:
    return transition(instance, event)


@app.post("/instances/{instance}")
def create(instance: str) -> JSONResponse:
    if create_workflow(instance):
        return JSONResponse({"id": instance, "state": INITIAL_STATE}, status_code=201)
    return JSONResponse({"error": f"instance {instance} exists"}, status_code=409)


class Event(BaseModel):
    event: str


@app.post("/instances/{instance}/events")
def event(instance: str, body: Event) -> JSONResponse:
    # A sync endpoint: FastAPI runs it on its worker threads (the workflow and its datasource
    # transaction are synchronous).
    result = event_workflow(instance, body.event)
    return JSONResponse(result, status_code=result.pop("status"))


async def main() -> None:
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=int(os.environ.get("DBOS_BENCH_PORT", "0")),
        log_level="warning",
        access_log=False,
        backlog=4096,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
            return
        await asyncio.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    await serving


if __name__ == "__main__":
    asyncio.run(main())
