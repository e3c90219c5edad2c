from train.cli import main
from train.distributed import end_process

end_process(main())
