"""`python -m services.worker`: the same as `turnout worker`."""

from services.worker.main import main

if __name__ == "__main__":
    main()
