import sys

from asyncvmm.jailer import main

sys.exit(main())
