"""conceptlab's Hydra configs (`pkg://conceptlab.conf`): train.yaml, generate.yaml and the config groups.

They ship inside the package, so the installed entry points find them from any folder; a user's own
configs join them with Hydra's `--config-dir` (or `hydra.searchpath`). In a checkout, `conf/` and
`experiments/` at the top are links to this folder and its `experiment/` group.
"""
