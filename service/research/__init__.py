"""The researcher's side of ``facesym analyze``: batches over folders, per-frame CSV, annotated video,
figures, progress. The engine stays pure; these modules read and write files for the CLI."""
