from rsnc_bench.cli import main

main()
