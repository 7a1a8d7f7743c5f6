import gc

from .cli import main

code = main()
# Leave what is left to the process's end: exit still runs atexit handlers and frees every module, but the
# interpreter's last cyclic collections skip the objects of torch/transformers/datasets (~1.5 s per process
# here). (Python makes no promise to finalize objects that are alive at exit in any case.)
gc.freeze()
raise SystemExit(code)
