import sys

from gui.preload import last_runtime, start_preloading

start_preloading(last_runtime())  # before the widgets are even imported

from gui.app import main  # noqa: E402

sys.exit(main())
