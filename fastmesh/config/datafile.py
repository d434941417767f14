"""Read a small YAML/JSON data file that is watched at run time (discovery targets, the mesh's
file registry): read and syntax errors become one ValueError naming the file and the place."""
from __future__ import annotations


def read_data_file(path: str) -> object:
    import yaml                      # here: only processes that watch such a file need it
    try:
        with open(path, "rb") as f:
            return yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{path}: invalid YAML/JSON{where}: "
                         f"{getattr(exc, 'problem', None) or exc}") from None
