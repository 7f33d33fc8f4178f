"""The explorer: a local web app over a run's concepts (`patchsae serve`) and the same content as a static site
(`patchsae report`)."""
