"""Stage kinds, one module per kind (two for Study E's builders in `cai`): each defines its config
class (a `farm.schema.StageSpec`), registered in `farm.registry.stages` with its `run`, its
`version`, its cost (`work`, `memory`) and what it makes (`produces`, `builds`). The study
schema, the keys, `farm plan`, `farm doctor` and `farm ls` read them from the registry.

A kind of one's own is a module in a package of one's own, named by an entry point of the group
`farm.stages` (`[project.entry-points."farm.stages"]` in its pyproject.toml): no change to the farm
(tests/test_kinds.py adds one)."""
