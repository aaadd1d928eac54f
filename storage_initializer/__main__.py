from storage_initializer.cli import main

main()
