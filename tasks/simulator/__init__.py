"""An Ollama simulator: the endpoints ``tasks`` uses, with GPU slots and faults.

Not part of the production app (the demo and the tests run it).
``python -m tasks.simulator --port 11434`` serves ``/api/tags``,
``/api/version``, ``/api/ps``, ``/api/generate``, ``/api/chat`` and
``/api/embed`` (streaming and not), in Ollama's formats.  Each model has GPU
slots: requests beyond them wait, as on a GPU.  Tokens come at a set rate and a
model takes a set time to load the first time it is used.

Faults are injected at start (``--fault KIND[,MODEL[,COUNT[,SECONDS]]]``) or at
run time with ``POST /_sim/faults {"kind": ..., "model": ..., "count": ...,
"seconds": ...}``:

* ``refuse``: close the listening socket for ``seconds`` (connection refused);
* ``500``: answer HTTP 500; ``loading``: HTTP 503 "model is loading";
* ``stall``: send one token, then nothing for ``seconds``, holding the slot;
* ``unknown``: answer 404 as for a model that is not pulled.

``GET /_sim/stats`` reports calls per endpoint, embedding batch sizes and the
most requests each model ran at once; ``DELETE /_sim/faults`` clears faults.
"""
from .models import DEFAULT_MODELS, FAULT_KINDS, Simulator
from .server import Server, serve

__all__ = ['DEFAULT_MODELS', 'FAULT_KINDS', 'Simulator', 'Server', 'serve']
