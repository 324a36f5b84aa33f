"""The reactions to a signup, one module each.

Each module declares a ``REACTION`` (see ``pipeline.registry``): its receivers, the job types
they push with their queue and policy, the handlers, and the hooks opening the resources those
handlers need. Every public module of this package is loaded by default (``REACTIONS``); a
new reaction is a new module here, or a module of your own added to ``REACTIONS``.

Both processes import these modules: none may import Quart or build the app.
"""
