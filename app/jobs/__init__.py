"""Asynchronous jobs: requests that outlive their HTTP connection, OpenAI's Batch API, durable store.

- `settings`   the `jobs:` config section
- `models`     Job / Batch / FileObject records and their public JSON shapes
- `store`      the JobStore interface (compare-and-swap records, due index, blobs); `sqlite_store`
               and `redis_store` implement it
- `ledger`     job state transitions on top of a store (claim, lease renewal, finish, cancel)
- `execute`    runs a job's body through the same FastAPI routes the Ingress serves, in-process
- `supervise`  one running job: lease renewal, cancellation, storing the outcome
- `conversion` the Ingress middleware that turns a slow non-streamed request into a job
- `callbacks`  Standard Webhooks signing and delivery; `ssrf` checks callback URLs
- `batches`    OpenAI batch input parsing and output/error files
- `runner`     the JobRunner deployment that owns execution and delivery
"""
