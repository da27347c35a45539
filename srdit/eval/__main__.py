import sys

from srdit.eval.main import main

sys.exit(main())
