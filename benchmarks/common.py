"""What every benchmark does with its result: print it and, if asked, write it as JSON."""

import json
import os
import platform


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"


def emit(result: dict, path=None) -> None:
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
