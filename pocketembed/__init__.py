"""pocketembed: an on-device embedding daemon for small GGUF bi-encoders.

The distribution installs four packages under this namespace:

* ``pocketembed.daemon`` (folder ``daemon/``): the engine and, later, the server;
* ``pocketembed.ipc`` (folder ``ipc/``): protocol and clients, never imports llama_cpp;
* ``pocketembed.gguf_models`` (folder ``gguf_models/``): the catalog and model preparation;
* ``pocketembed`` itself: settings, errors and the command line.
"""

__version__ = "0.1.0"
