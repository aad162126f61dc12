import sys

from shm_model.cli import main

sys.exit(main())
