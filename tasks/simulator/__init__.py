"""An Ollama simulator: the endpoints ``tasks`` uses, behaving as Ollama does.

Not part of the production app (the demo and the tests run it).
``python -m tasks.simulator --port 11434`` serves ``/api/tags``, ``/api/version``,
``/api/ps``, ``/api/show``, ``/api/generate``, ``/api/chat`` and ``/api/embed``
(streaming and not), in Ollama's formats, and schedules as Ollama does (see
:mod:`.models`): ``--models NAME=PARALLEL`` (``OLLAMA_NUM_PARALLEL``) requests
at once per model, the others waiting without a byte sent; ``--max-queue``
(``OLLAMA_MAX_QUEUE``) waiting in all, then 503 "server busy"; ``--load-time``
to load a model not in memory, reported as ``load_duration``; ``keep_alive``;
an empty prompt loads (``done_reason`` ``load``) or, with ``keep_alive`` 0,
unloads.  Answers have ``--tokens`` tokens (``done_reason`` ``stop``), or
``options.num_predict`` (``length``); ``format`` ("json" or a JSON schema) makes
the answer a JSON document; thinking models (gpt-oss, qwen3, deepseek-r1) send
``thinking`` first unless ``think`` is false; ``tools`` give a ``tool_calls``.

Faults are injected at start (``--fault KIND[,MODEL[,COUNT[,SECONDS]]]``) or at
run time with ``POST /_sim/faults {"kind": ..., "model": ..., "count": ...,
"seconds": ...}``:

* ``refuse``: Ollama goes away for ``seconds``: answers being streamed are cut,
  connections are refused, models leave memory;
* ``500``, ``503`` (server busy) or ``429``: answer that status;
* ``stall``: send one token, then nothing for ``seconds``, holding the slot;
* ``unknown``: answer 404 as for a model that is not pulled.

``GET /_sim/stats`` reports calls per endpoint, embedding batch sizes, loads,
waiting requests and the most requests each model ran at once;
``DELETE /_sim/faults`` clears faults.
"""
from .models import DEFAULT_MODELS, FAULT_KINDS, Simulator
from .server import Server, serve

__all__ = ['DEFAULT_MODELS', 'FAULT_KINDS', 'Simulator', 'Server', 'serve']
