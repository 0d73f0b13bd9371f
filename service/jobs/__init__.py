"""The job pipeline: study stability (assembler), the worker that analyses and reports, delivery, and the
APScheduler clock that drives them. The database job table is the queue."""
