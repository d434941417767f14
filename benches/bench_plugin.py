"""The trivial Python plugin benches/plugins.py measures: one header added upstream."""
from fastmesh.plugins import Plugin


class Touch(Plugin):
    name = "touch"
    priority = 100

    def access(self, request):
        request.add_header(b"X-Touched", b"1")
