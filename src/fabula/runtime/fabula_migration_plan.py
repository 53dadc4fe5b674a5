"""Run on a server with a release's Python and code: which migrations the release would apply to
the database, and whether each operation is safe while the previous release still runs
(additive) or not. Prints JSON. fabula's deploy reads it to choose serial or full."""
import json

import django

django.setup()

from django.db import connections  # noqa: E402
from django.db.migrations.executor import MigrationExecutor  # noqa: E402
from django.db.models.fields import NOT_PROVIDED  # noqa: E402

# operations that old code running beside the new schema does not notice
ADDITIVE = {"CreateModel", "AddIndex", "AlterModelOptions", "AlterModelManagers", "AddConstraint"}


def assess(operation):
    kind = type(operation).__name__
    if kind == "AddField":
        field = operation.field
        if field.null or getattr(field, "db_default", NOT_PROVIDED) is not NOT_PROVIDED:
            return True, "a nullable column (or one with a database default)"
        # Django fills existing rows from a Python default but keeps no default in the database
        return False, "a non-null column without a database default: the previous release cannot insert rows"
    if kind in ADDITIVE:
        return True, "additive"
    if kind in ("RunPython", "RunSQL"):
        return False, "custom code or SQL: fabula cannot tell whether the previous release copes"
    return False, "changes or removes what the previous release uses"


executor = MigrationExecutor(connections["default"])
plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
report = []
for migration, backwards in plan:
    operations = []
    for operation in migration.operations:
        additive, why = assess(operation)
        operations.append({"kind": type(operation).__name__, "description": operation.describe(),
                           "additive": additive and not backwards, "why": why})
    report.append({"migration": f"{migration.app_label}.{migration.name}", "operations": operations})
print(json.dumps(report))
