from train.cli import main

code = main()  # --help ends inside, before torch is imported below

from train.distributed import end_process  # noqa: E402

end_process(code)
