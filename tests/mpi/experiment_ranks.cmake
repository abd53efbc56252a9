# The expert-parallel training example on P = 1 … 4 ranks (docs/distributed.md, "Training"):
# every P writes the same losses as P = 1, to the last bit (the CSV holds them with 17 digits),
# and a run saved after half its steps and resumed on as many ranks continues with the losses of
# the run that never stopped.
#
#   cmake -DMPIEXEC=… -DEXAMPLE=… -DWORK=<scratch dir> -P experiment_ranks.cmake
foreach(variable MPIEXEC EXAMPLE WORK)
  if(NOT DEFINED ${variable})
    message(FATAL_ERROR "experiment_ranks.cmake needs -D${variable}=...")
  endif()
endforeach()
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}")
set(steps 14)
set(common --steps ${steps} --tokens 96 --seed 3)

function(run_ranks ranks)
  execute_process(COMMAND "${MPIEXEC}" -np ${ranks} --oversubscribe --bind-to none "${EXAMPLE}" ${ARGN}
                  RESULT_VARIABLE code OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT code EQUAL 0)
    message(FATAL_ERROR "grove_experiment_ep on ${ranks} rank(s) ${ARGN} failed (${code}):\n${out}\n${err}")
  endif()
endfunction()

function(require_same a b what)
  execute_process(COMMAND "${CMAKE_COMMAND}" -E compare_files "${a}" "${b}" RESULT_VARIABLE differ)
  if(differ)
    file(READ "${a}" ta)
    file(READ "${b}" tb)
    message(FATAL_ERROR "${what}: the losses differ\n--- ${a}\n${ta}\n--- ${b}\n${tb}")
  endif()
endfunction()

run_ranks(1 ${common} --csv "${WORK}/p1.csv")
file(STRINGS "${WORK}/p1.csv" lines)
list(LENGTH lines count)
math(EXPR want "${steps} + 1")
if(NOT count EQUAL want)
  message(FATAL_ERROR "p1.csv has ${count} lines, expected ${want}")
endif()
foreach(ranks 2 3 4)
  run_ranks(${ranks} ${common} --csv "${WORK}/p${ranks}.csv")
  require_same("${WORK}/p1.csv" "${WORK}/p${ranks}.csv" "P = ${ranks} against P = 1")
endforeach()

# Save after 7 steps on 3 ranks, resume to 14: the last 7 rows are those of the whole run.
math(EXPR half "${steps} / 2")
run_ranks(3 --steps ${half} --tokens 96 --seed 3 --save "${WORK}/saved")
foreach(file replicated.safetensors rank-0-of-3.safetensors rank-1-of-3.safetensors rank-2-of-3.safetensors)
  if(NOT EXISTS "${WORK}/saved/${file}")
    message(FATAL_ERROR "the saved run lacks ${file}")
  endif()
endforeach()
run_ranks(3 ${common} --resume "${WORK}/saved" --csv "${WORK}/resumed.csv")
file(STRINGS "${WORK}/resumed.csv" resumed)
list(SUBLIST lines ${half} -1 tail)  # the header is line 0: rows from step half - 1 on ...
list(REMOVE_AT tail 0)                # ... minus step half - 1
list(REMOVE_AT resumed 0)
if(NOT "${resumed}" STREQUAL "${tail}")
  message(FATAL_ERROR "the resumed run's losses differ from the whole run's:\n${resumed}\n---\n${tail}")
endif()

# Resuming on another number of ranks is refused, naming the saved count.
execute_process(COMMAND "${MPIEXEC}" -np 2 --oversubscribe --bind-to none "${EXAMPLE}" ${common} --resume "${WORK}/saved"
                RESULT_VARIABLE code OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(code EQUAL 0 OR NOT err MATCHES "holds a run on 3 ranks")
  message(FATAL_ERROR "resuming a 3-rank run on 2 ranks: exit ${code}, stderr:\n${err}")
endif()
message(STATUS "grove_experiment_ep: P = 1 … 4 bit for bit equal; save and resume continue the run")
