from spotrain.cli import main

main()
